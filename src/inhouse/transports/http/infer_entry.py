"""The one ASGI entry for the hot routes, ``POST /v2/models/{m}[/versions/{v}]/infer``.

Trace context and request id, the security gate (address rules, API key, scopes, rate limits,
the model's content policy and PII rules, the audit entry), the inference call, HTTP metrics
and the access log run inline in one coroutine, in front of the web application. Every other
request goes to the application and its middleware stack (observability, security,
compression, routing) unchanged.

Nothing here is a second implementation: the caller record, admission, body inspection and
the answer's texts are the security pipeline's, through the HTTP adapter's functions the
middleware uses (:mod:`~inhouse.transports.http.security`) and the route's own declaration
(``protocols.kserve_v2.rest.INFER_GUARD``); parsing, inference and rendering are
:func:`~inhouse.protocols.kserve_v2.rest.infer_request` and ``render_infer_response``, which the routed
endpoint calls too;
metrics and log lines are the
observability layer's (:class:`~inhouse.observability.access.HttpMetrics`,
:func:`~inhouse.observability.access.log_access`). What is gone is the per-request cost of
five stacked middlewares (closures, wrapped ``send`` callables, copied messages and scopes);
on a small model that cost was larger than the model (see ``bench/README.md``)."""

from __future__ import annotations

import gzip
import logging
import time
from functools import partial
from typing import NamedTuple

from starlette.types import ASGIApp, Receive, Scope, Send

from inhouse.core.dataplane import DataPlane
from inhouse.core.types import InferResponse
from inhouse.errors import AuditUnavailableError, InhouseError
from inhouse.observability.access import HttpMetrics, log_access
from inhouse.observability.context import RequestContext, activate, deactivate, new_context
from inhouse.observability.tracing import Tracer
from inhouse.protocols.cache_scope import cache_tenant
from inhouse.protocols.errors import as_inhouse_error, v2_error_parts
from inhouse.protocols.http_body import BodyReader, InferGuard, cancel_on_disconnect, header_text, receive_body
from inhouse.protocols.kserve_v2.json_wire import HEADER_LENGTH, render_infer_response
from inhouse.protocols.kserve_v2.rest import (
    INFER_GUARD,
    INFER_PATH,
    INFER_VERSION_PATH,
    PRIORITY_HEADER,
    infer_request,
    infer_target,
)
from inhouse.security.gate import Call, SecurityGate
from inhouse.security.pipeline import TextFn, open_call, rules_apply, transform_json_body
from inhouse.transports.http.security import admit, inspect_body

log = logging.getLogger(__name__)

_HEADER_LENGTH = HEADER_LENGTH.encode()
_PRIORITY = PRIORITY_HEADER.encode()
_JSON = b"application/json"


class Reply(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def error_reply(exc: BaseException) -> Reply:
    """The v2 error answer for any exception (an unexpected one becomes a logged 9000)."""
    return Reply(*v2_error_parts(exc))


class InferEntry:
    """ASGI app: v2 infer answered here, anything else passed to ``app``."""

    def __init__(self, app: ASGIApp, *, dataplane: DataPlane, gate: SecurityGate, max_request_bytes: int,
                 gzip_min_bytes: int = 0, http_metrics: HttpMetrics | None = None, tracer: Tracer | None = None,
                 access_log_enabled: bool = True, log_client_address: bool = False,
                 access_log_sample: float = 1.0) -> None:
        self.app = app
        self._dataplane = dataplane
        self._gate = gate
        self._limit = max_request_bytes
        self._gzip_min = gzip_min_bytes
        self._metrics = http_metrics
        self._tracer = tracer
        self._log = access_log_enabled
        self._client = log_client_address
        self._sample = access_log_sample

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = infer_target(scope["path"])
            if target is not None:
                await self._asgi_infer(scope, receive, send, target[0], target[1])
                return
        await self.app(scope, receive, send)

    async def _asgi_infer(self, scope: Scope, receive: Receive, send: Send, model: str, version: str | None) -> None:
        start = time.perf_counter()
        h: dict[bytes, bytes] = dict(scope["headers"])
        client = scope.get("client")
        reader = partial(receive_body, receive, self._limit, header_text(h.get(b"content-length")),
                         header_text(h.get(b"content-encoding")))
        try:
            reply = await self.answer(scope["path"], model, version, h, client[0] if client else None, reader,
                                      partial(cancel_on_disconnect, receive), start)
        except AuditUnavailableError as err:  # answered by nobody rather than unrecorded: 503, as on the fast path
            reply = error_reply(err)
        await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def answer(self, path: str, model: str, version: str | None, h: dict[bytes, bytes], peer: str | None,
                     read_body: BodyReader, guard: InferGuard[InferResponse], start: float) -> Reply:
        """The whole answer to one v2 infer request, whatever carried it (the ASGI entry above or
        the HTTP fast path, ``transports/http/fast_path.py``): trace context, security gate, body rules,
        inference, the audit entry, and the metrics and access-log line, which are recorded before
        the caller sends the answer (a client holding its answer finds them there). ``read_body``
        returns the (decoded) request body; ``guard`` awaits the inference and cancels it when the
        client goes away. Raises only when the request was cancelled or the server failed; the
        metrics, log line and audit entry are recorded then too."""
        ctx = new_context(h.get(b"traceparent"), h.get(b"x-request-id"), time.time_ns())
        span = self._tracer.start_request(ctx, f"POST {path}") if self._tracer is not None else None
        token = activate(ctx)
        call = open_call("http", INFER_GUARD, model=model, version=version, peer=peer,
                         forwarded_for=header_text(h.get(b"x-forwarded-for")),
                         authorization=header_text(h.get(b"authorization")), api_key=header_text(h.get(b"x-api-key")),
                         request_id=ctx.request_id, trace_id=ctx.trace_id)
        try:
            status, headers, body = await self._respond(read_body, guard, h, ctx, call, model, version)
        except BaseException as exc:
            self._finish(path, peer, ctx, span, version, exc.http_status if isinstance(exc, InhouseError) else 500,
                         start)
            raise
        finally:
            deactivate(token)
            if not call.recorded:
                await self._gate.record(call, 500, 9000, "the request failed before a response was sent")
        headers.append((b"traceparent", ctx.traceparent().encode()))
        headers.append((b"x-request-id", ctx.request_id.encode()))
        self._finish(path, peer, ctx, span, version, status, start)
        return Reply(status, headers, body)

    async def _respond(self, read_body: BodyReader, guard: InferGuard[InferResponse], h: dict[bytes, bytes],
                       ctx: RequestContext, call: Call, model: str,
                       version: str | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and body of the answer; the audit entry is committed before it."""
        gate = self._gate
        body: bytes | None = None
        output_fn: TextFn | None = None
        try:
            if gate.active:  # keys, address rules, rate limits or the audit log are on
                admit(gate, INFER_GUARD, call)
            else:
                call.recorded = True  # no audit log: nothing to record
            needed, spec = rules_apply(gate, INFER_GUARD, model)
            if needed:
                body = await read_body()
                body, output_fn = inspect_body(gate, call, INFER_GUARD, spec, body, _HEADER_LENGTH in h)
        except Exception as exc:  # refused by the security layer: never compressed
            err = as_inhouse_error(exc)
            await gate.record(call, err.http_status, err.code, err.message)
            return self._error(err, ctx)
        dataplane = self._dataplane
        try:
            try:
                if body is None:
                    body = await read_body()
            except Exception as exc:
                dataplane.infer_rejected(model, exc)
                raise
            req = infer_request(dataplane, body, header_text(h.get(_HEADER_LENGTH)), header_text(h.get(_PRIORITY)),
                                model, version)
            req.cache_tenant = cache_tenant(header_text(h.get(b"cache-control")), call.credential)
            resp = await guard(dataplane.infer(req))
            content, extra = render_infer_response(resp, req)
        except Exception as exc:
            err = as_inhouse_error(exc)
            status, headers, content = self._error(err, ctx)
            await gate.record(call, status, err.code, str(err))
            if output_fn is not None:  # the client's Accept-Encoding was set aside for the output rules
                return status, headers, content
            return self._compress(status, headers, content, h)
        if output_fn is not None:
            if extra["content-type"].encode().startswith(_JSON):
                content = transform_json_body(content, output_fn)
            await gate.record(call, 200, None)
            return 200, self._headers(extra, content), content  # output texts rewritten: not compressed
        await gate.record(call, 200, None)
        return self._compress(200, self._headers(extra, content), content, h)

    @staticmethod
    def _headers(extra: dict[str, str], content: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        headers.append((b"content-length", str(len(content)).encode()))
        return headers

    @staticmethod
    def _error(err: InhouseError, ctx: RequestContext) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if ctx.code is None:  # for the access log and the trace
            ctx.code = err.code
        return error_reply(err)

    def _compress(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes,
                  h: dict[bytes, bytes]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if not (0 < self._gzip_min <= len(content) and b"gzip" in h.get(b"accept-encoding", b"")):
            return status, headers, content
        content = gzip.compress(content, compresslevel=6)
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        headers += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding"),
                    (b"content-length", str(len(content)).encode())]
        return status, headers, content

    def _finish(self, path: str, peer: str | None, ctx: RequestContext, span: object, version: str | None, status: int,
                start: float) -> None:
        seconds = time.perf_counter() - start
        route = INFER_PATH if version is None else INFER_VERSION_PATH
        if self._metrics is not None:
            self._metrics.observe("POST", route, status, seconds)
        if span is not None and self._tracer is not None:
            self._tracer.end_request(span, ctx, route, status)
        if self._log:
            log_access("POST", path, peer, ctx, route, status, seconds, self._client, self._sample)
