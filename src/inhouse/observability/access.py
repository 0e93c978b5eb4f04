"""Plain ASGI middleware around the whole HTTP app: request id and W3C ``traceparent`` (taken
from the client or started here, and returned on every response), one access-log line per
request, HTTP request metrics and, when configured, the request's trace spans.

Access logs never carry payloads, query strings or headers; the client address only when
``log_client_address`` is set."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inhouse.logs import json_line_sink
from inhouse.observability.context import RequestContext, activate, deactivate, new_context
from inhouse.observability.fast import CounterChild, FastCounter, FastHistogram, HistogramChild
from inhouse.observability.metrics import LATENCY_BUCKETS, Metrics
from inhouse.observability.tracing import Tracer
from inhouse.security.pii import redact

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
                 access_log_enabled: bool = True, log_client_address: bool = False,
                 access_log_sample: float = 1.0) -> None:
        self.app = app
        self._metrics = http_metrics
        self._tracer = tracer
        self._log = access_log_enabled
        self._client = log_client_address
        self._sample = access_log_sample

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
                   self._client, self._sample)


_redacted: dict[str, str] = {}


def _pii_safe(text: str) -> str:
    """``text`` as the log handler's PII filter would write it; paths and method names repeat,
    so the redaction of each is remembered (a bounded table, emptied when full)."""
    out = _redacted.get(text)
    if out is None:
        if len(_redacted) >= 4096:
            _redacted.clear()
        out = _redacted[text] = redact(text)
    return out


_stamp_ms = -1
_stamp = ""


def _timestamp(now: float) -> str:
    """The JSON formatter's ``ts`` for ``now``, formatted once per millisecond (lines come faster)."""
    global _stamp_ms, _stamp
    ms = int(now * 1000)
    if ms != _stamp_ms:
        sec = int(now)
        _stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{int((now - sec) * 1000):03d}Z"
        _stamp_ms = ms
    return _stamp


def _ms(seconds: float) -> float:
    """``round(seconds * 1000, 3)``, at a third of its cost."""
    return int(seconds * 1e6 + 0.5) / 1000


def _emit(level: int, msg: str, fields: dict[str, Any], pii_keys: tuple[str, ...]) -> None:
    """One access-log line. When the server's JSON handler is the only destination, the line is
    built here with orjson (what the handler's formatter and filters would write, key for key)
    and written in one batch with the lines of the next few milliseconds; otherwise (text format,
    a log capture or another handler attached) it goes through logging as a record."""
    sink = json_line_sink(access_log)
    if sink is None:
        access_log.log(level, msg, extra=fields)
        return
    doc: dict[str, Any] = {"ts": _timestamp(time.time()), "level": "warning" if level >= logging.WARNING else "info",
                           "logger": "inhouse.access", "msg": msg, **fields}
    for key in pii_keys:
        value = doc.get(key)
        if isinstance(value, str):
            doc[key] = _pii_safe(value)
    sink.write(orjson.dumps(doc, default=str))


def sampled_out(ok: bool, sample: float) -> bool:
    """Whether a request skips its access-log line: only successful ones can, with probability
    ``1 - sample``; errors and refusals are always logged."""
    return ok and sample < 1.0 and random.random() >= sample


def log_access(method: str, path: str, peer: str | None, ctx: RequestContext, route: str, status: int,
               seconds: float, client_address: bool, sample: float = 1.0) -> None:
    """The one access-log line of an HTTP request (no payloads, query strings or headers)."""
    level = logging.WARNING if status >= 500 else logging.INFO
    if not access_log.isEnabledFor(level) or sampled_out(status < 400, sample):
        return
    extra: dict[str, Any] = {
        "request_id": ctx.request_id, "trace_id": ctx.trace_id, "method": method, "route": route,
        "path": path, "status": status, "latency_ms": _ms(seconds),
    }
    if ctx.model is not None:
        extra["model"] = ctx.model
        extra["version"] = ctx.version
    if ctx.code is not None:
        extra["code"] = ctx.code
    if ctx.queue_s is not None:
        extra["queue_ms"] = _ms(ctx.queue_s)
    if ctx.compute_s is not None:
        extra["compute_ms"] = _ms(ctx.compute_s)
    if client_address and peer:
        extra["client"] = peer
    _emit(level, "request", extra, ("path",))


_GRPC_FAILED = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


def log_rpc(method: str, ctx: RequestContext, code: str, seconds: float, sample: float = 1.0) -> None:
    """The one access-log line of a gRPC call (no messages, no metadata)."""
    level = logging.WARNING if code in _GRPC_FAILED else logging.INFO
    if not access_log.isEnabledFor(level) or sampled_out(code == "OK", sample):
        return
    extra: dict[str, Any] = {"request_id": ctx.request_id, "trace_id": ctx.trace_id, "rpc": method,
                             "grpc_code": code, "latency_ms": _ms(seconds)}
    if ctx.model is not None:
        extra["model"], extra["version"] = ctx.model, ctx.version
    if ctx.code is not None:
        extra["code"] = ctx.code
    _emit(level, "rpc", extra, ("rpc", "grpc_code"))
