"""Plain ASGI middleware around the whole HTTP app: request id and W3C ``traceparent`` (taken
from the client or started here, and returned on every response), one access-log line per
request, HTTP request metrics and, when configured, the request's trace spans.

Access logs never carry payloads, query strings or headers; the client address only when
``log_client_address`` is set."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inhouse.observability.context import RequestContext, activate, deactivate, new_context
from inhouse.observability.fast import CounterChild, FastCounter, FastHistogram, HistogramChild
from inhouse.observability.metrics import LATENCY_BUCKETS, Metrics
from inhouse.observability.tracing import Tracer

access_log = logging.getLogger("inhouse.access")

_ERROR_CODE = b"inhouse-error-code"


class HttpMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = FastCounter("inhouse_http_requests", "HTTP requests by route and status.",
                                ["method", "route", "status"], registry=metrics.registry)
        self.duration = FastHistogram("inhouse_http_request_duration_seconds",
                                  "HTTP request time, from the request line to the last response byte.",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=metrics.registry)
        self._children: dict[tuple[str, str, int], tuple[CounterChild, HistogramChild]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.requests.labels(method, route, str(status)),
                                          self.duration.labels(route))
        pair[0].inc()
        pair[1].observe(seconds)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def method_of(scope: Scope) -> str:
    """The HTTP method as a label value: clients may send any token, labels must stay bounded."""
    method: str = scope["method"]
    return method if method in _METHODS else "OTHER"


def route_of(scope: Scope) -> str:
    """The matched route template (bounded label values), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, http_metrics: HttpMetrics | None = None, tracer: Tracer | None = None,
                 access_log_enabled: bool = True, log_client_address: bool = False) -> None:
        self.app = app
        self._metrics = http_metrics
        self._tracer = tracer
        self._log = access_log_enabled
        self._client = log_client_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        traceparent = request_id = None
        for k, v in scope["headers"]:
            if k == b"traceparent":
                traceparent = v
            elif k == b"x-request-id":
                request_id = v
        ctx = new_context(traceparent, request_id, time.time_ns())
        span = self._tracer.start_request(ctx, f"{scope['method']} {scope['path']}") if self._tracer else None
        echo = [(b"traceparent", ctx.traceparent().encode()), (b"x-request-id", ctx.request_id.encode())]
        status = 500
        finished = False

        def finish() -> None:
            # Record before the last body chunk goes out, so a client that has its answer can rely on the
            # metrics and the access log line already being there (and a failure still records in `finally`).
            nonlocal finished
            finished = True
            seconds = time.perf_counter() - start
            route = ctx.route if ctx.route is not None else route_of(scope)
            if self._metrics is not None:
                self._metrics.observe(method_of(scope), route, status, seconds)
            if span is not None and self._tracer is not None:
                self._tracer.end_request(span, ctx, route, status)
            if self._log:
                self._access(scope, ctx, route, status, seconds)

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if ctx.code is None:
                    for k, v in headers:
                        if k == _ERROR_CODE:
                            ctx.code = int(v) if v.isdigit() else None
                message = {**message, "headers": headers + echo}
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not finished:
                finish()
            await send(message)

        token = activate(ctx)
        try:
            await self.app(scope, receive, send_with_context)
        finally:
            deactivate(token)
            if not finished:
                finish()

    def _access(self, scope: Scope, ctx: RequestContext, route: str, status: int, seconds: float) -> None:
        client = scope.get("client")
        log_access(scope["method"], scope["path"], client[0] if client else None, ctx, route, status, seconds,
                   self._client)


def log_access(method: str, path: str, peer: str | None, ctx: RequestContext, route: str, status: int,
               seconds: float, client_address: bool) -> None:
    """The one access-log line of an HTTP request (no payloads, query strings or headers)."""
    level = logging.WARNING if status >= 500 else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    extra: dict[str, Any] = {
        "request_id": ctx.request_id, "trace_id": ctx.trace_id, "method": method, "route": route,
        "path": path, "status": status, "latency_ms": round(seconds * 1000, 3),
    }
    if ctx.model is not None:
        extra["model"] = ctx.model
        extra["version"] = ctx.version
    if ctx.code is not None:
        extra["code"] = ctx.code
    if ctx.queue_s is not None:
        extra["queue_ms"] = round(ctx.queue_s * 1000, 3)
    if ctx.compute_s is not None:
        extra["compute_ms"] = round(ctx.compute_s * 1000, 3)
    if client_address and peer:
        extra["client"] = peer
    access_log.log(level, "request", extra=extra)
