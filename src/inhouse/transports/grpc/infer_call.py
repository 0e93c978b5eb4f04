"""``inference.GRPCInferenceService/ModelInfer`` answered by the HTTP/2 front itself
(``front.py``), without grpc.aio: the same steps the interceptors and the servicer run for it,
in one coroutine, as the REST fast path does for v2 infer.

Observability (``grpc_server_*`` metrics, request context, the access-log line), the decode
guard (bytes that are not a ``ModelInferRequest`` → INVALID_ARGUMENT, 2001), security (keys,
scopes, the key's model list, address rules, rate limits, content policy and PII rules, the
audit entry committed before the answer) and the servicer's parse → infer → render are the
modules grpc.aio runs (:class:`~inhouse.transports.grpc.security.RpcChecks`,
:mod:`~inhouse.protocols.kserve_v2.grpc_wire`); errors are rendered by
:func:`~inhouse.protocols.errors.grpc_error`, as every gRPC refusal is."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import quote

import grpc

from inhouse.core.dataplane import DataPlane
from inhouse.errors import AuditUnavailableError, CancelledError, InhouseError
from inhouse.observability.access import log_rpc
from inhouse.observability.context import activate, deactivate, new_context
from inhouse.observability.metrics import GrpcMetrics
from inhouse.protocols.cache_scope import headers_tenant
from inhouse.protocols.errors import as_inhouse_error, grpc_error
from inhouse.protocols.http_body import client_gone
from inhouse.protocols.kserve_v2.grpc_service import RPC_GUARDS, SERVICE_NAME
from inhouse.protocols.kserve_v2.grpc_wire import parse_infer_request, render_infer_response
from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.security.gate import SecurityGate
from inhouse.security.pipeline import as_served
from inhouse.transports.grpc.decode import undecodable_error
from inhouse.transports.grpc.security import RpcChecks

METHOD = f"/{SERVICE_NAME}/ModelInfer"
OK_TRAILERS = ((b"grpc-status", b"0"),)


class Answer(NamedTuple):
    """One unary answer: the response message (None for an error) and the trailers."""

    message: bytes | None
    trailers: list[tuple[bytes, bytes]]


def status_trailers(code: grpc.StatusCode, message: str,
                    metadata: tuple[tuple[str, str | bytes], ...] = ()) -> list[tuple[bytes, bytes]]:
    """``grpc-status``, ``grpc-message`` (percent-encoded, as the gRPC spec wants) and the
    metadata (``-bin`` values base64 without padding)."""
    out = [(b"grpc-status", str(code.value[0]).encode()),
           (b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii"))]
    for key, value in metadata:
        if isinstance(value, bytes):
            out.append((key.encode(), base64.b64encode(value).rstrip(b"=")))
        else:
            out.append((key.encode(), value.encode("latin-1", "replace")))
    return out


def error_trailers(exc: BaseException) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The status name (for the metrics) and trailers of any exception, as ``grpc_abort`` renders it."""
    code, details, metadata = grpc_error(exc)
    return code.name, status_trailers(code, details, metadata)


class InferCall:
    """Answers ModelInfer calls; built once per server."""

    def __init__(self, dataplane: DataPlane, gate: SecurityGate, metrics: GrpcMetrics, *,
                 access_log_enabled: bool, access_log_sample: float) -> None:
        self._dataplane = dataplane
        self._gate = gate
        self._rpc = RpcChecks(gate, as_served(RPC_GUARDS[METHOD], gate.settings.open_readiness))
        labels = ("unary", SERVICE_NAME, "ModelInfer")
        self._started = metrics.started.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)
        self._handled = metrics.handled
        self._labels = labels
        self._log = access_log_enabled
        self._sample = access_log_sample

    async def answer(self, md: Mapping[str, str], peer: str | None, message: bytes,
                     timeout_s: float | None) -> Answer:
        """The answer to one call: ``md`` is its text metadata (lower-case keys), ``message`` the
        request message's bytes (decompressed), ``timeout_s`` what ``grpc-timeout`` left."""
        start = time.perf_counter()
        self._started.inc()
        ctx = new_context(md.get("traceparent"), md.get("x-request-id"), time.time_ns())
        token = activate(ctx)
        code = "OK"
        try:
            body = await self._respond(md, peer, message, timeout_s)
            trailers = [*OK_TRAILERS, (b"traceparent", ctx.traceparent().encode()),
                        (b"x-request-id", ctx.request_id.encode())]
            return Answer(body, trailers)
        except Exception as exc:
            if isinstance(exc, InhouseError) and ctx.code is None:
                ctx.code = exc.code
            code, trailers = error_trailers(exc)
            return Answer(None, trailers)
        except BaseException:
            code = "CANCELLED"
            raise
        finally:
            deactivate(token)
            seconds = time.perf_counter() - start
            self._handled.labels(*self._labels, code).inc()
            self._seconds.observe(seconds)
            if self._log:
                log_rpc(METHOD, ctx, code, seconds, self._sample)

    async def _respond(self, md: Mapping[str, str], peer: str | None, message: bytes,
                       timeout_s: float | None) -> bytes:
        try:
            request = pb.ModelInferRequest.FromString(message)
        except Exception:  # DecodeError, and what protobuf raises for too deep or bad UTF-8
            raise undecodable_error(METHOD, len(message)) from None
        rpc, gate = self._rpc, self._gate
        call = exchange = None
        if gate.active or rpc.rules_apply(request):
            call = rpc.open(md, peer)
            try:
                gate.admit(call)
                exchange = rpc.check(call, request, None)
            except Exception as exc:
                err = as_inhouse_error(exc)
                with contextlib.suppress(AuditUnavailableError):  # a refusal goes out even when unrecorded
                    await gate.record(call, err.http_status, err.code, err.message)
                raise err from None
        try:
            req = parse_infer_request(request, timeout_s)
            req.cache_tenant = headers_tenant(md)
            try:
                resp = await self._dataplane.infer(req)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None:
                    raise
                # the client reset the call or went away: recorded and counted as CANCELLED (3003)
                raise client_gone(task) from None
            result = render_infer_response(resp, req)
            if exchange is not None:
                exchange.render(result)
        except Exception as exc:
            if call is not None and not call.recorded:
                if isinstance(exc, CancelledError):
                    await gate.record(call, exc.http_status, exc.code, exc.message)
                else:
                    # as the servicer's errors are recorded behind grpc.aio: the status, not our code
                    code, _, _ = grpc_error(exc)
                    await gate.record(call, 500, None, f"gRPC status {code}")
            raise
        if call is not None and not call.recorded:
            await gate.record(call, 200, None)  # AuditUnavailableError: UNAVAILABLE (4050), unanswered
        out: bytes = result.SerializeToString()
        return out
