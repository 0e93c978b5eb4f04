"""The gRPC front end: a grpc.aio server in the server's own event loop, serving KServe v2
(``inference.GRPCInferenceService``), OpenClaw's ``openclaw.api.v1.ModelService``, health
checking and reflection over the same data plane
as REST, with the limits, keep-alive and TLS from the settings.

With ``grpc.front: fast`` (the default) the port is served by inhouse's own HTTP/2 front
(``front.py``), which answers ModelInfer itself and forwards every other RPC to this grpc.aio
server, then listening only on a Unix socket in a private folder; ``grpcio`` puts grpc.aio on
the port itself."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from inhouse.core.dataplane import DataPlane
from inhouse.listen import ListenError
from inhouse.llm.service import LLMService
from inhouse.observability.metrics import GrpcMetrics
from inhouse.protocols import openclaw_grpc
from inhouse.protocols.kserve_v2.grpc_service import SERVICE_NAME, InferenceServicer
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.protocols.proto import openclaw_model_service_pb2_grpc as openclaw_pb_grpc
from inhouse.protocols.proto._pool import POOL
from inhouse.security.gate import SecurityGate
from inhouse.settings import GrpcSettings, ServerSettings
from inhouse.transports.grpc.decode import DecodeGuardInterceptor
from inhouse.transports.grpc.front import FrontConfig, FrontServer
from inhouse.transports.grpc.health import HealthServicer
from inhouse.transports.grpc.infer_call import InferCall
from inhouse.transports.grpc.intercept import CachedWrapInterceptor, WrappingRegistrar
from inhouse.transports.grpc.limits import ConcurrencyLimitInterceptor
from inhouse.transports.grpc.observability import GrpcObservabilityInterceptor
from inhouse.transports.grpc.security import SecurityInterceptor
from inhouse.transports.tls import TlsMaterial, server_context

log = logging.getLogger(__name__)

# Reflection answers from inhouse's descriptor pool, so it must also know the health and
# reflection protos (they live in protobuf's default pool).
for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    POOL.AddSerializedFile(_file.serialized_pb)

REFLECTED_SERVICES = (SERVICE_NAME, openclaw_grpc.SERVICE_NAME,
                      health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
STOP_GRACE_S = 5.0


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcPortError(ListenError):
    """The gRPC port cannot be opened."""


def server_options(g: GrpcSettings, reuse_port: bool = False) -> list[tuple[str, int]]:
    keepalive_ms = int(g.keepalive_time_s * 1000)
    return [
        ("grpc.max_receive_message_length", g.max_message_bytes),
        ("grpc.max_send_message_length", g.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(g.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # let clients ping as often as the server itself does, without a GOAWAY
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min(keepalive_ms, 10_000)),
        ("grpc.http2.max_ping_strikes", 0),
        # a port in use must fail the start, not be shared silently (worker processes share it on purpose)
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


class GrpcFrontEnd:
    """The gRPC server over the services it is given. Interceptors, outermost first:
    observability (``grpc_server_*`` metrics, request context, access log), the decode guard
    (undecodable messages → INVALID_ARGUMENT), security, then the
    concurrency limit when one is set."""

    def __init__(self, settings: ServerSettings, tls: TlsMaterial | None, dataplane: DataPlane,
                 llm: LLMService, gate: SecurityGate, metrics: GrpcMetrics, *, reuse_port: bool = False) -> None:
        self._settings = settings
        self._tls = tls
        self._dataplane = dataplane
        self._llm = llm  # chat models stream through ModelStreamInfer
        self._reuse_port = reuse_port
        self._gate = gate
        self._metrics = metrics
        self._front: FrontServer | None = None
        self._inner_folder: str | None = None
        # what the front adds to each forwarded call so the inner server trusts its address
        # metadata, over the private socket only
        self._secret = secrets.token_hex(16)
        self.interceptors: list[grpc.aio.ServerInterceptor] = [
            GrpcObservabilityInterceptor(metrics, access_log_enabled=settings.access_log,
                                         access_log_sample=settings.access_log_sample),
            DecodeGuardInterceptor(),
            SecurityInterceptor(gate, front_secret=self._secret if settings.grpc.front == "fast" else None),
        ]
        if settings.grpc.max_concurrent_rpcs is not None:
            self.interceptors.append(ConcurrencyLimitInterceptor(settings.grpc.max_concurrent_rpcs))
        self._aio: grpc.aio.Server | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> int:
        """Bind and start; returns the bound port (``GrpcPortError`` when it cannot listen)."""
        settings, g, interceptors = self._settings, self._settings.grpc, self.interceptors
        # Our handlers are coroutines; the pool only runs synchronous handlers others may add.
        pool = ThreadPoolExecutor(max_workers=g.max_workers, thread_name_prefix="inhouse-grpc")
        # inhouse's own interceptors wrap each handler once, as the services register, so no
        # interceptor pipeline runs per call; any other interceptor keeps grpc's own pipeline (all of
        # them then run there, in order)
        at_registration = all(isinstance(i, CachedWrapInterceptor) for i in interceptors)
        aio = grpc.aio.server(migration_thread_pool=pool, interceptors=None if at_registration else interceptors,
                              options=server_options(g, self._reuse_port))
        target: Any = WrappingRegistrar(aio, interceptors) if at_registration and interceptors else aio
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated
            InferenceServicer(self._dataplane, llm=self._llm), target)
        openclaw_pb_grpc.add_ModelServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated
            openclaw_grpc.ModelServicer(self._dataplane), target)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self._dataplane), target)
        # what enable_server_reflection registers for a grpc.aio server (it checks the type, so call it ourselves)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(REFLECTED_SERVICES, pool=POOL), target)

        if g.front == "fast":
            self._aio, self._pool = aio, pool
            try:
                return await self._start_front(aio)
            except BaseException:
                await self.stop()
                raise
        address = grpc_address(settings.host, settings.grpc_port)
        tls = self._tls
        port: int
        try:
            if tls is not None:
                creds = grpc.ssl_server_credentials(
                    [(tls.private_key, tls.cert_chain)], root_certificates=tls.client_ca,
                    require_client_auth=tls.mutual,
                )
                port = aio.add_secure_port(address, creds)
            else:
                port = aio.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            pool.shutdown(wait=False)
            raise GrpcPortError(
                f"Cannot listen for gRPC on {address}. Another process may use the port; stop it or "
                "choose another port (--grpc-port), or turn gRPC off (grpc.enabled: false)."
            )
        await aio.start()
        self._aio, self._pool = aio, pool
        log.info("gRPC listening", extra={"address": grpc_address(settings.host, port), "tls": tls is not None,
                                          "mutual_tls": bool(tls and tls.mutual)})
        return port

    @property
    def inner_socket(self) -> str | None:
        """The Unix socket grpc.aio listens on behind the front (None without the front)."""
        return None if self._inner_folder is None else os.path.join(self._inner_folder, "grpc.sock")

    async def _start_front(self, aio: grpc.aio.Server) -> int:
        """grpc.aio on a Unix socket in a folder of its own (0700), and the front on the port."""
        settings, g = self._settings, self._settings.grpc
        folder = self._inner_folder = tempfile.mkdtemp(prefix="inhouse-grpc-")
        inner = os.path.join(folder, "grpc.sock")
        if aio.add_insecure_port(f"unix:{inner}") == 0:
            raise GrpcPortError(f"Cannot listen for gRPC on the private socket {inner}.")
        await aio.start()
        # the front answers ModelInfer only where that is all the interceptors would do: a
        # concurrency limit, or an interceptor someone added, sees every call in grpc.aio instead
        ours = all(type(i) in (GrpcObservabilityInterceptor, DecodeGuardInterceptor, SecurityInterceptor)
                   for i in self.interceptors)
        infer = InferCall(self._dataplane, self._gate, self._metrics, access_log_enabled=settings.access_log,
                          access_log_sample=settings.access_log_sample) if ours else None
        config = FrontConfig(infer, g.max_message_bytes, inner, self._secret, g.keepalive_time_s,
                             g.keepalive_timeout_s)
        ssl_ctx = None
        if self._tls is not None:
            ssl_ctx = server_context(self._tls)
            ssl_ctx.set_alpn_protocols(["h2"])
        front = FrontServer(config)
        try:
            port = await front.start(settings.host, settings.grpc_port, ssl=ssl_ctx, reuse_port=self._reuse_port)
        except OSError as exc:
            raise GrpcPortError(
                f"Cannot listen for gRPC on {grpc_address(settings.host, settings.grpc_port)} ({exc.strerror}). "
                "Another process may use the port; stop it or choose another port (--grpc-port), or turn gRPC "
                "off (grpc.enabled: false).") from exc
        self._front = front
        log.info("gRPC listening", extra={"address": grpc_address(settings.host, port), "tls": self._tls is not None,
                                          "mutual_tls": bool(self._tls and self._tls.mutual), "front": "fast"})
        return port

    async def stop(self) -> None:
        if self._front is not None:
            await self._front.stop(STOP_GRACE_S)  # GOAWAY; what is in flight, forwarded too, finishes
        if self._aio is not None:
            await self._aio.stop(STOP_GRACE_S)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._inner_folder is not None:
            shutil.rmtree(self._inner_folder, ignore_errors=True)
