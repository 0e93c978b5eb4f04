"""The HTTP edge of the security layer: a plain ASGI middleware in front of every REST route.
It finds the route's declared :class:`~inhouse.security.pipeline.Guard` with Starlette's own
route matching, and runs :mod:`inhouse.security.pipeline` over the request: admission, the
model's content policy and PII rules on the body (through the route's text visitor), the audit
entry before the response starts, and the answer's texts. It knows no URL and no API."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inhouse.core.json_doc import json_object
from inhouse.core.spec import ModelSpec
from inhouse.errors import AuditUnavailableError
from inhouse.observability.context import current as current_request
from inhouse.protocols.errors import as_inhouse_error, error_renderer
from inhouse.protocols.http_body import read_body
from inhouse.security.gate import Call, SecurityGate, new_request_id
from inhouse.security.pipeline import (
    UNDECLARED,
    AnswerStream,
    Guard,
    TextFn,
    as_served,
    audit_payload,
    body_model,
    check_request,
    guard_of,
    guarded,
    open_call,
    output_rules,
    rules_apply,
    stream_framing,
    transform_json_body,
)

REQUEST_ID_HEADER = "x-request-id"
_Match = tuple[Guard, dict[str, Any], str | None]


def match_guard(routes: list[BaseRoute], scope: Scope) -> _Match:
    """The guard, path parameters and route template of the route a request reaches (a route
    that matches only by path, answered 405, lends its guard); an undeclared or unknown route is
    admins' only."""
    full, partial = _match(routes, scope)
    return full or partial or (UNDECLARED, {}, None)


def _match(routes: list[BaseRoute], scope: Scope) -> tuple[_Match | None, _Match | None]:
    partial: _Match | None = None
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's include_router keeps the router
        if included is not None:
            full, inner = _match(included.routes, scope)
            if full is not None:
                return full, None
            partial = partial or inner
            continue
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        guard = guard_of(child.get("endpoint")) or UNDECLARED
        template = getattr(route, "path", None)
        if match is Match.FULL:
            return (guard, child.get("path_params", {}), template), None
        # answered 405 without reading the body: no text rules
        partial = partial or (dataclasses.replace(guard, texts=None), child.get("path_params", {}), template)
    return None, partial


class RouteGuards:
    """The declared guard of each (method, path) seen, as this server enforces it (``as_served``),
    remembered: after the first request to a path, finding its guard is one dict lookup."""

    def __init__(self, open_readiness: bool = True) -> None:
        self._known: dict[tuple[str, str], _Match] = {}
        self._open_readiness = open_readiness

    def find(self, scope: Scope) -> _Match:
        key = (scope["method"], scope["path"])
        hit = self._known.get(key)
        if hit is None:
            app = scope.get("app")
            routes = getattr(getattr(app, "router", None), "routes", [])
            guard, params, template = match_guard(routes, scope)
            hit = as_served(guard, self._open_readiness), params, template
            if len(self._known) >= 4096:  # many distinct paths (model names): start over rather than grow
                self._known.clear()
            self._known[key] = hit
        return hit


def guard_docs(app: Any) -> None:
    """Declares the web framework's own documentation routes (OpenAPI schema, Swagger UI):
    any valid key may read them."""
    paths = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None}
    for route in app.routes:
        if getattr(route, "path", None) in paths:
            guarded(DOCS)(route.endpoint)


DOCS = Guard("docs", "any")


def trace_id(traceparent: str | None) -> str | None:
    # W3C trace context: version-traceid-spanid-flags
    parts = traceparent.split("-") if traceparent else []
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def http_call(guard: Guard, params: dict[str, Any], h: dict[str, str], peer: str | None) -> Call:
    """The caller record of an HTTP request, with the observability layer's request id and trace
    when it runs."""
    ctx = current_request()
    model = params.get("model") if guard.model == "path" else None
    version = params.get("version") if guard.model == "path" else None
    return open_call("http", guard, model=model or None, version=version, peer=peer,
                     forwarded_for=h.get("x-forwarded-for"), authorization=h.get("authorization"),
                     api_key=h.get("x-api-key"),
                     request_id=ctx.request_id if ctx else new_request_id(h.get(REQUEST_ID_HEADER)),
                     trace_id=ctx.trace_id if ctx else trace_id(h.get("traceparent")))


def admit(gate: SecurityGate, guard: Guard, call: Call) -> None:
    gate.admit(call)
    if guard.every_model and call.model is None:
        gate.check_all_models(call)


def inspect_body(gate: SecurityGate, call: Call, guard: Guard, spec: ModelSpec | None, body: bytes,
                 binary: bool) -> tuple[bytes, TextFn | None]:
    """The pipeline's request step on a (decompressed) HTTP body: returns the body to pass on
    and the function that rewrites the answer's texts, if any."""
    texts = guard.texts
    if texts is None:
        if guard.body_names_model:  # no texts to inspect, but the key may not be for this model
            body_model(gate, call, guard, json_object(body))
        return body, None
    doc: Any = None
    if not binary and not (texts.skip is not None and texts.skip(body)):
        doc = json_object(body)
    if guard.body_names_model:
        spec = body_model(gate, call, guard, doc)
    redacted = check_request(call, spec, texts, doc, len(body), binary=binary)
    audit_payload(gate, call, body)
    if redacted is not None:
        body = orjson.dumps(doc)
    return body, output_rules(spec, redacted)


class _Answer:
    """What the middleware holds of one answer while it rewrites or records it."""

    __slots__ = ("error", "held", "refused", "start", "stream")

    def __init__(self) -> None:
        self.start: Message | None = None  # held back: an error, or an answer whose texts are rewritten
        self.error = False
        self.refused = False  # its audit entry could not be written: a 503 went out instead of it
        self.held: list[bytes] = []
        self.stream: AnswerStream | None = None


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, gate: SecurityGate, max_request_bytes: int) -> None:
        self.app = app
        self.gate = gate
        self.max_request_bytes = max_request_bytes
        self.guards = RouteGuards(gate.settings.open_readiness)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.gate.active:
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard, params, template = self.guards.find(scope)
        ctx = current_request()
        if ctx is not None:
            # for the access log and metrics: the router's own scope["route"] is set on scopes the
            # outer middleware never sees (a rewritten request) or not at all (a refused one)
            ctx.route = template
        if guard.scope == "open":
            await self.app(scope, receive, send)
            return
        h = _headers(scope)
        client = scope.get("client")
        call = http_call(guard, params, h, client[0] if client else None)
        echo = ctx is None  # the observability layer echoes the request id when it runs
        gate = self.gate
        output_fn: TextFn | None = None
        try:
            admit(gate, guard, call)
            if guard.texts is not None or guard.body_names_model:
                scope, receive, output_fn = await self._inspect(call, guard, scope, receive, h)
        except Exception as exc:
            err = as_inhouse_error(exc)
            with contextlib.suppress(AuditUnavailableError):  # a refusal goes out even when it cannot be recorded
                await gate.record(call, err.http_status, err.code, err.message)
            response = error_renderer(scope["path"])(err)
            if echo:
                response.headers[REQUEST_ID_HEADER] = call.request_id
            await response(scope, receive, send)
            return
        extra = [(REQUEST_ID_HEADER.encode(), call.request_id.encode("latin-1"))] if echo else []
        answer = _Answer()
        stream_fn = guard.texts.stream if guard.texts is not None else None

        async def refuse(err: AuditUnavailableError) -> None:
            """The answer's audit entry could not be committed: a 503 instead, and the rest dropped."""
            answer.refused = True
            response = error_renderer(scope["path"])(err)
            response.headers[REQUEST_ID_HEADER] = call.request_id
            await response(scope, receive, send)

        async def send_wrapper(message: Message) -> None:
            if answer.refused:
                return
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *extra]
                message = {**message, "headers": headers}
                ctype = next((v for k, v in headers if k == b"content-type"), b"")
                framing = stream_framing(ctype)
                if message["status"] >= 400 and framing is None:
                    answer.start, answer.error = message, True  # recorded with its message once the body is here
                    return
                try:
                    await gate.record(call, message["status"], _error_code(headers))
                except AuditUnavailableError as err:
                    await refuse(err)
                    return
                if output_fn is None or not (framing is not None or ctype.startswith(b"application/json")):
                    await send(message)
                elif framing is not None:
                    message["headers"] = [(k, v) for k, v in headers if k != b"content-length"]
                    answer.stream = framing(output_fn, stream_fn)
                    await send(message)
                else:
                    answer.start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            more = message.get("more_body", False)
            if answer.stream is not None:
                await send({"type": "http.response.body", "body": answer.stream.feed(message.get("body", b""), more),
                            "more_body": more})
                return
            start = answer.start
            if start is None:
                await send(message)
                return
            answer.held.append(message.get("body", b""))
            if more:
                return
            body = b"".join(answer.held)
            if answer.error:
                try:
                    await gate.record(call, start["status"], _error_code(start["headers"]), _error_message(body))
                except AuditUnavailableError as err:
                    await refuse(err)
                    return
            else:
                body = transform_json_body(body, output_fn)  # type: ignore[arg-type]  # set when not an error
                start["headers"] = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                start["headers"].append((b"content-length", str(len(body)).encode()))
            await send(start)
            await send({"type": "http.response.body", "body": body, "more_body": False})

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not call.recorded:
                with contextlib.suppress(AuditUnavailableError):  # the app's own failure is the one to raise
                    await gate.record(call, 500, 9000, "the request failed before a response was sent")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No WebSocket routes exist today; any future one gets the same admission check."""
        h = _headers(scope)
        client = scope.get("client")
        call = open_call("websocket", Guard("websocket", "infer"), model=None, version=None,
                         peer=client[0] if client else None, forwarded_for=h.get("x-forwarded-for"),
                         authorization=h.get("authorization"), api_key=h.get("x-api-key"),
                         request_id=new_request_id(h.get(REQUEST_ID_HEADER)), trace_id=None)
        try:
            self.gate.admit(call)
        except Exception as exc:
            err = as_inhouse_error(exc)
            await self.gate.record(call, err.http_status, err.code, err.message)
            await send({"type": "websocket.close", "code": 1008, "reason": str(err)[:120]})
            return
        await self.gate.record(call, 101, None)
        await self.app(scope, receive, send)

    async def _inspect(self, call: Call, guard: Guard, scope: Scope, receive: Receive,
                       h: dict[str, str]) -> tuple[Scope, Receive, TextFn | None]:
        """Read the body when the model's rules (or the key's model list) need it; apply the
        content policy and input redaction; return the (possibly rewritten) request."""
        needed, spec = rules_apply(self.gate, guard, call.model)
        if not needed:
            return scope, receive, None
        body = await read_body(Request(scope, receive), self.max_request_bytes)
        body, output_fn = inspect_body(self.gate, call, guard, spec, body, "inference-header-content-length" in h)
        drop = {b"content-length", b"content-encoding"} | ({b"accept-encoding"} if output_fn else set())
        headers = [(k, v) for k, v in scope["headers"] if k not in drop]
        headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return {**scope, "headers": headers}, replay, output_fn


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _error_code(headers: list[tuple[bytes, bytes]]) -> int | None:
    return next((int(v) for k, v in headers if k == b"inhouse-error-code" and v.isdigit()), None)


def _error_message(body: bytes) -> str | None:
    """The message of an error body in any of our formats (v2 and Ollama, OpenAI, Anthropic)."""
    try:
        doc = orjson.loads(body[:65536]) if body else None
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err) if err is not None else None
