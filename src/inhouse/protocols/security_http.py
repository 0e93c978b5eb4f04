"""The HTTP edge of the security layer: a plain ASGI middleware in front of every REST route
(KServe v2, OpenAI, Anthropic, metrics, docs). It classifies the route, asks the
:class:`~inhouse.security.gate.SecurityGate` whether the call may proceed, applies the
model's content policy and PII rules to the request body, and commits the audit entry before
the response starts. The wire formats it reads are only those needed to find the texts."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inhouse.core.spec import ModelSpec
from inhouse.errors import InvalidRequestError, PolicyBlockedError
from inhouse.observability.context import current as current_request
from inhouse.protocols.errors import as_inhouse_error, error_renderer
from inhouse.protocols.http_body import json_object, read_body
from inhouse.security.gate import Call, SecurityGate, new_request_id
from inhouse.security.gate import Scope as NeedScope
from inhouse.security.pii import Redactor, Vault, redact
from inhouse.security.policy import check_policy

OPEN_PATHS = frozenset({"/v2/health/live", "/health/live"})
LLM_ROUTES = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions",
              "/v1/embeddings": "embeddings", "/v1/messages": "messages",
              "/v1/messages/count_tokens": "messages.count_tokens", "/v1/responses": "responses"}
_V2_MODEL = re.compile(
    r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready|/config|/generate|/generate_stream|/stats)?/?$")
_V2_REPO = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)/?$")
_NOT_TEXT_KEYS = frozenset({"id", "model", "object", "role", "type", "finish_reason", "stop_reason", "name",
                            "datatype", "model_name", "model_version", "system_fingerprint", "tool_call_id"})
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True, slots=True)
class Route:
    action: str
    scope: NeedScope
    model: str | None = None
    version: str | None = None
    kind: str = "other"  # v2infer | llm | other


def classify(method: str, path: str) -> Route:
    if path in OPEN_PATHS:
        return Route("health.live", "open")
    if path in ("/v2/health/ready", "/health", "/health/ready"):
        return Route("health", "metrics")
    if path.startswith("/metrics"):
        return Route("metrics", "metrics")
    if path == "/v2":
        return Route("server.metadata", "infer")
    m = _V2_MODEL.match(path)
    if m:
        what = (m.group(3) or "/metadata")[1:]
        if what.startswith("generate"):
            return Route(what, "infer", m.group(1), m.group(2), "v2gen" if method == "POST" else "other")
        return Route("infer" if what == "infer" else f"model.{what}", "infer", m.group(1), m.group(2),
                     "v2infer" if what == "infer" and method == "POST" else "other")
    m = _V2_REPO.match(path)
    if m:
        return Route(f"repository.{m.group(2)}", "admin", m.group(1))
    if path.startswith("/v2/repository"):
        return Route("repository.index", "admin")
    if path.startswith("/v2/security/keys"):
        verb = {"POST": "create", "DELETE": "revoke"}.get(method, "list")
        return Route(f"keys.{verb}", "admin")
    action = LLM_ROUTES.get(path.rstrip("/"))
    if action is not None:
        return Route(action, "infer", kind="llm" if method == "POST" else "other")
    if path.startswith("/v1/models"):
        return Route("models.list", "infer")
    if path.startswith(("/docs", "/openapi.json", "/redoc")):
        return Route("docs", "any")
    if path.startswith("/v1/"):
        return Route("other", "infer")
    return Route("other", "admin")  # a route this layer does not know: only admins (fail closed)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _credential(h: dict[str, str]) -> str | None:
    return credential(h.get("authorization"), h.get("x-api-key"))


def credential(authorization: str | None, api_key: str | None) -> str | None:
    """The API key a request presents: ``Authorization: Bearer KEY``, else ``x-api-key``."""
    if authorization:
        kind, _, value = authorization.partition(" ")
        return value.strip() if kind.lower() == "bearer" else None
    return api_key


def _trace_id(traceparent: str | None) -> str | None:
    # W3C trace context: version-traceid-spanid-flags
    parts = traceparent.split("-") if traceparent else []
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


# ---- texts inside request and response bodies --------------------------------------------------
TextFn = Callable[[str], str]


def _map_content(value: Any, fn: TextFn) -> Any:
    """A message 'content' / 'system' / 'prompt' / 'input': a string, or a list of strings or
    parts with 'text' (and nested 'content', as in tool results)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict):
                if isinstance(item.get("text"), str):
                    item["text"] = fn(item["text"])
                if "content" in item:
                    item["content"] = _map_content(item["content"], fn)
                out.append(item)
            else:
                out.append(_map_content(item, fn))
        return out
    return value


def map_llm_texts(doc: dict[str, Any], fn: TextFn) -> None:
    for key in ("system", "prompt", "input", "instructions"):
        if key in doc:
            doc[key] = _map_content(doc[key], fn)
    messages = doc.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict) and "content" in msg:
                msg["content"] = _map_content(msg["content"], fn)


def llm_tools(doc: dict[str, Any]) -> list[str] | None:
    tools = doc.get("tools")
    if not isinstance(tools, list):
        return None
    names = []
    for t in tools:
        if isinstance(t, dict):
            fn = t.get("function")
            name = fn.get("name") if isinstance(fn, dict) else t.get("name")
            names.append(str(name))
    return names


def _map_nested(value: Any, fn: TextFn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_nested(v, fn) for v in value]
    return value


def map_v2_texts(doc: dict[str, Any], fn: TextFn, key: str = "inputs") -> None:
    tensors = doc.get(key)
    if not isinstance(tensors, list):
        return
    for t in tensors:
        if isinstance(t, dict) and t.get("datatype") == "BYTES" and "data" in t:
            t["data"] = _map_nested(t["data"], fn)


def map_v2gen_texts(doc: dict[str, Any], fn: TextFn) -> None:
    """KServe v2 generate extension: ``text_input``."""
    if isinstance(doc.get("text_input"), str):
        doc["text_input"] = fn(doc["text_input"])


def map_all_texts(value: Any, fn: TextFn) -> Any:
    """Every string value of a response document except identifiers and enum-like fields."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_all_texts(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: v if k in _NOT_TEXT_KEYS else map_all_texts(v, fn) for k, v in value.items()}
    return value


# ---- the middleware -----------------------------------------------------------------------------
class SecurityMiddleware:
    def __init__(self, app: ASGIApp, gate: SecurityGate, max_request_bytes: int) -> None:
        self.app = app
        self.gate = gate
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.gate.active:
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        route = classify(method, path)
        if route.scope == "open":
            await self.app(scope, receive, send)
            return
        h = _headers(scope)
        client = scope.get("client")
        ctx = current_request()  # the observability layer's request id and trace, when it runs
        call = Call(transport="http", action=route.action, scope=route.scope, model=route.model,
                    version=route.version, peer=client[0] if client else None,
                    forwarded_for=h.get("x-forwarded-for"), credential=_credential(h),
                    request_id=ctx.request_id if ctx else new_request_id(h.get(REQUEST_ID_HEADER)),
                    trace_id=ctx.trace_id if ctx else _trace_id(h.get("traceparent")))
        gate = self.gate
        output_fn: TextFn | None = None
        try:
            gate.admit(call)
            if route.kind != "other":
                scope, receive, output_fn = await self._inspect(call, route, scope, receive, h)
        except Exception as exc:
            err = as_inhouse_error(exc)
            await gate.record(call, err.http_status, err.code, err.message)
            response = error_renderer(path)(err)
            if ctx is None:
                response.headers[REQUEST_ID_HEADER] = call.request_id
            await response(scope, receive, send)
            return
        echo = [] if ctx is not None else [(REQUEST_ID_HEADER.encode(), call.request_id.encode("latin-1"))]
        held: list[Message] = []

        error_start: list[Message] = []

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(echo)
                message = {**message, "headers": headers}
                if message["status"] >= 400 and not _is_sse(headers):
                    error_start.append(message)  # recorded with its message once the body is here
                    return
                await gate.record(call, message["status"], _error_code(headers))
                if output_fn is not None and _is_json_or_sse(headers):
                    held.append(message)
                    return
            elif message["type"] == "http.response.body" and error_start:
                error_start.append(message)
                if message.get("more_body", False):
                    return
                start, body = error_start[0], b"".join(m.get("body", b"") for m in error_start[1:])
                await gate.record(call, start["status"], _error_code(start["headers"]), _error_message(body))
                error_start.clear()
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            elif message["type"] == "http.response.body" and held:
                await self._send_transformed(message, held, send, output_fn)  # type: ignore[arg-type]
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not call.recorded:
                await gate.record(call, 500, 9000, "the request failed before a response was sent")

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """No WebSocket routes exist today; any future one gets the same admission check."""
        h = _headers(scope)
        client = scope.get("client")
        call = Call(transport="websocket", action="websocket", scope="infer", peer=client[0] if client else None,
                    forwarded_for=h.get("x-forwarded-for"), credential=_credential(h),
                    request_id=new_request_id(h.get(REQUEST_ID_HEADER)))
        try:
            self.gate.admit(call)
        except Exception as exc:
            err = as_inhouse_error(exc)
            await self.gate.record(call, err.http_status, err.code, err.message)
            await send({"type": "websocket.close", "code": 1008, "reason": str(err)[:120]})
            return
        await self.gate.record(call, 101, None)
        await self.app(scope, receive, send)

    async def _send_transformed(self, message: Message, held: list[Message], send: Send, fn: TextFn) -> None:
        start = held[0]
        sse = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])
        if sse:
            if len(held) == 1:
                start["headers"] = [(k, v) for k, v in start["headers"] if k != b"content-length"]
                await send(start)
                held.append({"type": "_sse_buffer", "data": b"", "state": SseTexts(fn)})
            buf = held[1]["data"] + message.get("body", b"")
            more = message.get("more_body", False)
            events, _, rest = buf.rpartition(b"\n\n") if more else (buf, b"", b"")
            held[1]["data"] = rest
            out = held[1]["state"].transform(events + (b"\n\n" if more and events else b""))
            await send({"type": "http.response.body", "body": out, "more_body": more})
            return
        held.append(message)
        if message.get("more_body", False):
            return
        body = transform_json_body(b"".join(m.get("body", b"") for m in held[1:]), fn)
        headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _inspect(self, call: Call, route: Route, scope: Scope, receive: Receive,
                       h: dict[str, str]) -> tuple[Scope, Receive, TextFn | None]:
        """Read the body when the model's rules (or the key's model list) need it; apply the
        content policy and input redaction; return the (possibly rewritten) request."""
        needed, spec = body_needed(self.gate, route)
        if not needed:
            return scope, receive, None
        body = await read_body(Request(scope, receive), self.max_request_bytes)
        body, output_fn = inspect_body(self.gate, call, route, spec, body, "inference-header-content-length" in h)
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

    @staticmethod
    def _apply_rules(call: Call, spec: ModelSpec | None, doc: dict[str, Any] | None, size: int, binary: bool,
                     llm: bool, gen: bool = False) -> tuple[bytes, Vault] | None:
        if spec is None:
            return None
        policy, pii = spec.policy, spec.pii
        if binary and ((policy is not None and policy.deny_patterns) or (pii is not None and pii.inputs)):
            raise PolicyBlockedError(f"Model '{spec.name}' has text rules (content policy or PII redaction) that "
                                     "need JSON tensor data; do not use the binary tensor data extension for it.")
        if policy is not None:
            texts: list[str] = []
            if doc is not None and policy.deny_patterns:

                def collect(s: str) -> str:
                    texts.append(s)
                    return s

                _mapper(llm, gen)(doc, collect)
            check_policy(policy, spec.name, size=size, texts=texts,
                         tools=llm_tools(doc) if llm and doc is not None else None)
        if pii is None or not pii.inputs or doc is None:
            return None
        vault = Vault()
        redactor = Redactor(pii.detectors)
        _mapper(llm, gen)(doc, lambda s: redactor.redact(s, vault))
        if vault.originals:
            call.detail["pii_redacted"] = len(vault.originals)
        return orjson.dumps(doc), vault


def body_needed(gate: SecurityGate, route: Route) -> tuple[bool, ModelSpec | None]:
    """Whether the security layer must read a request's body (LLM routes, audited payloads, a
    model with a content policy or PII rules), and the model's serving spec when known."""
    llm = route.kind == "llm"
    spec = None if llm else gate.spec_for(route.model)
    return llm or gate.settings.audit_payloads or (
        spec is not None and (spec.policy is not None or spec.pii is not None)), spec


def inspect_body(gate: SecurityGate, call: Call, route: Route, spec: ModelSpec | None, body: bytes,
                 binary: bool) -> tuple[bytes, TextFn | None]:
    """Apply the model's content policy and input redaction to a (decompressed) request body;
    returns the body to pass on and the function that rewrites the response texts, if any."""
    llm = route.kind == "llm"
    doc: dict[str, Any] | None = None
    if not binary and not (route.kind == "v2infer" and cannot_hold_text(body)):
        doc = json_object(body)
    if llm:
        model = doc.get("model") if doc is not None else None
        if not isinstance(model, str):
            raise InvalidRequestError("The request needs a 'model' field naming the model to use.")
        gate.check_model(call, model)
        spec = gate.spec_for(model)
    rewritten = SecurityMiddleware._apply_rules(call, spec, doc, len(body), binary, llm, route.kind == "v2gen")
    if gate.settings.audit_payloads:
        call.detail["request"] = redact(body[:4096].decode("utf-8", "replace"))
    output_fn: TextFn | None = None
    pii = spec.pii if spec is not None else None
    if rewritten is not None:
        body = rewritten[0]
    if pii is not None and pii.outputs == "restore" and rewritten is not None:
        output_fn = rewritten[1].restore
    elif pii is not None and pii.outputs == "redact":
        output_fn = Redactor(pii.detectors).redact
    return body, output_fn


def cannot_hold_text(body: bytes) -> bool:
    """Whether a v2 infer JSON body certainly has no BYTES tensor, so text rules find nothing in
    it and it need not be parsed here (the v2 parser reads it next): no ``BYTES`` in it, and no
    escape at all (a ``\\u`` escape could spell one). Only BYTES tensors may carry text."""
    return b"BYTES" not in body and b"\\" not in body  # one byte: a memchr, not a substring search


def transform_json_body(body: bytes, fn: TextFn) -> bytes:
    """A JSON response body with its texts rewritten (PII restored or redacted); any other
    body unchanged."""
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.dumps(map_all_texts(orjson.loads(body), fn))
    return body


def _error_code(headers: list[tuple[bytes, bytes]]) -> int | None:
    return next((int(v) for k, v in headers if k == b"inhouse-error-code" and v.isdigit()), None)


def _error_message(body: bytes) -> str | None:
    """The message of an error body in any of our formats (v2, OpenAI, Anthropic)."""
    try:
        doc = orjson.loads(body[:65536]) if body else None
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err) if err is not None else None


def _is_sse(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)


def _mapper(llm: bool, gen: bool) -> Callable[[dict[str, Any], TextFn], None]:
    return map_llm_texts if llm else map_v2gen_texts if gen else map_v2_texts


def _is_json_or_sse(headers: list[tuple[bytes, bytes]]) -> bool:
    ctype = next((v for k, v in headers if k == b"content-type"), b"")
    return ctype.startswith((b"application/json", b"text/event-stream"))


_PARTIAL_PLACEHOLDER = re.compile(r"\[[A-Z_]{0,10}\d{0,6}$")


class SseTexts:
    """Rewrites the texts of one server-sent-event stream (OpenAI and Anthropic streaming). A
    placeholder such as ``[PHONE_1]`` usually arrives split over several token deltas, so a
    delta that ends in what may be the start of one is held back and joined to the next delta
    of the same choice / content block before restoring."""

    def __init__(self, fn: TextFn) -> None:
        self.fn = fn
        self.held: dict[str, str] = {}

    def text(self, key: str, text: str, final: bool) -> str:
        text = self.held.pop(key, "") + text
        if not final:
            m = _PARTIAL_PLACEHOLDER.search(text)
            if m:
                self.held[key] = text[m.start():]
                text = text[:m.start()]
        return self.fn(text)

    def _event(self, doc: Any) -> list[Any]:
        """The event (plus, for Anthropic, a delta event carrying held text before a block ends)."""
        if not isinstance(doc, dict):
            return [doc]
        choices = doc.get("choices")
        if isinstance(choices, list):  # OpenAI chat / completions chunks
            for c in choices:
                if not isinstance(c, dict):
                    continue
                key, final = f"c{c.get('index', 0)}", c.get("finish_reason") is not None
                delta = c.get("delta")
                if isinstance(delta, dict) and (isinstance(delta.get("content"), str) or (final and key in self.held)):
                    delta["content"] = self.text(key, delta.get("content") or "", final)
                elif isinstance(c.get("text"), str):
                    c["text"] = self.text(key, c["text"], final)
        kind = doc.get("type")
        key = f"a{doc.get('index', 0)}"
        delta = doc.get("delta")
        if kind == "content_block_delta" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
            delta["text"] = self.text(key, delta["text"], False)
        elif kind == "content_block_stop" and key in self.held:
            flush = {"type": "content_block_delta", "index": doc.get("index", 0),
                     "delta": {"type": "text_delta", "text": self.text(key, "", True)}}
            return [flush, map_all_texts(doc, self.fn)]
        return [map_all_texts(doc, self.fn)]

    def transform(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for block in data.split(b"\n\n"):
            lines = block.split(b"\n")
            docs: list[Any] | None = None
            for i, line in enumerate(lines):
                payload = line[5:].strip() if line.startswith(b"data:") else b""
                if payload and payload != b"[DONE]":
                    with contextlib.suppress(orjson.JSONDecodeError):
                        docs = self._event(orjson.loads(payload))
                        lines[i] = b"data: " + orjson.dumps(docs[-1])
            if docs and len(docs) > 1:
                out.extend(b"event: content_block_delta\ndata: " + orjson.dumps(d) for d in docs[:-1])
            out.append(b"\n".join(lines))
        return b"\n\n".join(out)
