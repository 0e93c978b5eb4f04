"""The gRPC front end: a grpc.aio server in the server's own event loop, serving KServe v2
(``inference.GRPCInferenceService``), health checking and reflection over the same data plane
as REST, with the limits, keep-alive and TLS from the settings."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from inhouse.grpc_intercept import CachedWrapInterceptor, WrappingRegistrar
from inhouse.grpc_limits import ConcurrencyLimitInterceptor
from inhouse.protocols.grpc_health import HealthServicer
from inhouse.protocols.kserve_grpc import SERVICE_NAME, InferenceServicer
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.protocols.proto._pool import POOL

if TYPE_CHECKING:
    from inhouse.server import InhouseServer

log = logging.getLogger(__name__)

# Reflection answers from inhouse's descriptor pool, so it must also know the health and
# reflection protos (they live in protobuf's default pool).
for _file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
    POOL.AddSerializedFile(_file.serialized_pb)

REFLECTED_SERVICES = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                      reflection.SERVICE_NAME)
STOP_GRACE_S = 5.0


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_options(server: InhouseServer) -> list[tuple[str, int]]:
    g = server.settings.grpc
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
        # a port in use must fail the start, not be shared silently
        ("grpc.so_reuseport", 0),
    ]


async def start_grpc(server: InhouseServer) -> Callable[[], Awaitable[None]]:
    """Bind and start; returns the coroutine function that stops it. Front-end hook for
    ``InhouseServer.front_ends``."""
    from inhouse.server import StartupError

    settings, g = server.settings, server.settings.grpc
    interceptors: list[grpc.aio.ServerInterceptor] = list(server.grpc_interceptors)
    if g.max_concurrent_rpcs is not None:
        interceptors.append(ConcurrencyLimitInterceptor(g.max_concurrent_rpcs))
    # Our handlers are coroutines; the pool only runs synchronous handlers others may add.
    pool = ThreadPoolExecutor(max_workers=g.max_workers, thread_name_prefix="inhouse-grpc")
    # inhouse's own interceptors wrap each handler once, as the services register, so no
    # interceptor pipeline runs per call; any other interceptor keeps grpc's own pipeline (all of
    # them then run there, in order)
    at_registration = all(isinstance(i, CachedWrapInterceptor) for i in interceptors)
    aio = grpc.aio.server(migration_thread_pool=pool, interceptors=None if at_registration else interceptors,
                          options=server_options(server))
    target: Any = WrappingRegistrar(aio, interceptors) if at_registration and interceptors else aio
    llm = getattr(server.app.state, "llm", None)  # chat models stream through ModelStreamInfer (issue 5)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]  # generated
        InferenceServicer(server.dataplane, llm=llm), target)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(server.dataplane), target)
    # what enable_server_reflection registers for a grpc.aio server (it checks the type, so call it ourselves)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(REFLECTED_SERVICES, pool=POOL), target)

    address = grpc_address(settings.host, settings.grpc_port)
    tls = server.tls
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
        raise StartupError(
            f"Cannot listen for gRPC on {address}. Another process may use the port; stop it or "
            "choose another port (--grpc-port), or turn gRPC off (grpc.enabled: false)."
        )
    await aio.start()
    server.grpc_port = port
    log.info("gRPC listening", extra={"address": grpc_address(settings.host, port), "tls": tls is not None,
                                      "mutual_tls": bool(tls and tls.mutual)})

    async def stop() -> None:
        await aio.stop(STOP_GRACE_S)
        pool.shutdown(wait=False)

    return stop
