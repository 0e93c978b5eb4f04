"""A grpc.aio server interceptor: the ``grpc_server_*`` metrics users know from
go-grpc-prometheus / py-grpc-prometheus, the request context (``traceparent`` and
``x-request-id`` metadata) and one access-log line per RPC."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from inhouse.observability.access import log_rpc
from inhouse.observability.context import RequestContext, activate, deactivate, new_context
from inhouse.observability.metrics import GrpcMetrics
from inhouse.transports.grpc.intercept import CachedWrapInterceptor, RpcKind, Streaming, Unary


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


def _code_name(context: Any, raised: BaseException | None) -> str:
    code = None
    try:
        code = context.code()
    except Exception:  # older grpc.aio contexts
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for sc in grpc.StatusCode:
            if sc.value[0] == code:
                return str(sc.name)
    if raised is None:
        return "OK"
    return "CANCELLED" if isinstance(raised, asyncio.CancelledError) else "UNKNOWN"


class GrpcObservabilityInterceptor(CachedWrapInterceptor):
    def __init__(self, metrics: GrpcMetrics, *, access_log_enabled: bool = True,
                 access_log_sample: float = 1.0) -> None:
        super().__init__()
        self.metrics = metrics
        self._log = access_log_enabled
        self._sample = access_log_sample

    def _begin(self, started: Any, context: Any) -> RequestContext:
        started.inc()
        traceparent = request_id = None
        for key, value in context.invocation_metadata() or ():
            if key == "traceparent":
                traceparent = value
            elif key == "x-request-id":
                request_id = value
        return new_context(traceparent, request_id, time.time_ns())

    def _finish(self, ctx: RequestContext, labels: tuple[str, str, str], seconds_hist: Any, method: str,
                context: Any, raised: BaseException | None, start: float) -> None:
        seconds = time.perf_counter() - start
        code = _code_name(context, raised)
        self.metrics.handled.labels(*labels, code).inc()
        seconds_hist.observe(seconds)
        if self._log:
            log_rpc(method, ctx, code, seconds, self._sample)

    def _unary(self, behavior: Unary, method: str, kind: RpcKind) -> Unary:
        service, name = _split(method)
        labels = (kind.label, service, name)
        # the series of this method, looked up once (grpc series are never removed)
        started, seconds_hist = self.metrics.started.labels(*labels), self.metrics.seconds.labels(*labels)

        async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
            ctx = self._begin(started, context)
            token, start, raised = activate(ctx), time.perf_counter(), None
            with contextlib.suppress(Exception):  # returning the trace context is best effort
                context.set_trailing_metadata((("traceparent", ctx.traceparent()), ("x-request-id", ctx.request_id)))
            try:
                return await behavior(request, context)
            except BaseException as err:
                raised = err
                raise
            finally:
                with contextlib.suppress(ValueError):  # a generator closed from another context
                    deactivate(token)
                self._finish(ctx, labels, seconds_hist, method, context, raised, start)

        return wrapped

    def _streaming(self, behavior: Streaming, method: str, kind: RpcKind) -> Streaming:
        service, name = _split(method)
        labels = (kind.label, service, name)

        started, seconds_hist = self.metrics.started.labels(*labels), self.metrics.seconds.labels(*labels)

        async def wrapped(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            ctx = self._begin(started, context)
            token, start, raised = activate(ctx), time.perf_counter(), None
            sent = self.metrics.msg_sent.labels(*labels)
            try:
                async for item in behavior(request, context):
                    sent.inc()
                    yield item
            except BaseException as err:
                raised = err
                raise
            finally:
                with contextlib.suppress(ValueError):  # a generator closed from another context
                    deactivate(token)
                self._finish(ctx, labels, seconds_hist, method, context, raised, start)

        return wrapped
