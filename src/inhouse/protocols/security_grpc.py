"""The gRPC edge of the security layer: a grpc.aio server interceptor that runs the same
:class:`~inhouse.security.gate.SecurityGate` checks as the HTTP middleware (API key from the
``authorization: Bearer`` or ``x-api-key`` metadata, client address from the peer) and commits
the audit entry before the response is sent."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from inhouse.core.spec import ModelSpec
from inhouse.errors import InhouseError
from inhouse.grpc_intercept import CachedWrapInterceptor
from inhouse.observability.context import current as current_request
from inhouse.protocols.errors import as_inhouse_error, grpc_abort
from inhouse.security.gate import Call, Scope, SecurityGate, new_request_id
from inhouse.security.pii import PieceTexts, PiiRules, Vault
from inhouse.security.policy import check_policy, tool_names

_SERVICE = "/inference.GRPCInferenceService/"
_SCOPES: dict[str, tuple[str, Scope]] = {
    "ServerLive": ("health.live", "open"),
    "ServerReady": ("health", "metrics"),
    "ServerMetadata": ("server.metadata", "infer"),
    "ModelReady": ("model.ready", "infer"),
    "ModelMetadata": ("model.metadata", "infer"),
    "ModelConfig": ("model.config", "infer"),
    "ModelStatistics": ("model.statistics", "infer"),
    "ModelInfer": ("infer", "infer"),
    "ModelStreamInfer": ("infer.stream", "infer"),
    "RepositoryIndex": ("repository.index", "admin"),
    "RepositoryModelLoad": ("repository.load", "admin"),
    "RepositoryModelUnload": ("repository.unload", "admin"),
}
_NAME_FIELD_METHODS = frozenset({"ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"})


def classify_grpc(method: str) -> tuple[str, Scope, str | None]:
    """(action, scope, the request field naming the model) of a full gRPC method name."""
    if method.startswith("/grpc.health.v1.Health/"):
        return "health.live", "open", None
    if method.startswith(_SERVICE):
        short = method[len(_SERVICE):]
        action, scope = _SCOPES.get(short, (short, "any"))
        return action, scope, "name" if short in _NAME_FIELD_METHODS else "model_name"
    return method.rsplit("/", 1)[-1] or "other", "any", None


def peer_address(peer: str | None) -> str | None:
    """'ipv4:10.0.0.1:5000' / 'ipv6:[::1]:5000' → the address."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return None


def _metadata(md: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in md or () if isinstance(v, str)}


def _credential(md: dict[str, str]) -> str | None:
    auth = md.get("authorization")
    if auth:
        kind, _, value = auth.partition(" ")
        return value.strip() if kind.lower() == "bearer" else None
    return md.get("x-api-key")


def _raw_elements(blob: bytes) -> list[bytes] | None:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then the bytes),
    or None when the blob is malformed (the request is then refused when it is parsed)."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            return None
        n = int.from_bytes(blob[pos:pos + 4], "little")
        if pos + 4 + n > len(blob):
            return None
        out.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def _raw_blob(elements: list[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def _tensor_texts(request: Any, index: int) -> list[str]:
    """The elements of one BYTES input of a ModelInferRequest, as text (typed contents or raw)."""
    tensor = request.inputs[index]
    if getattr(tensor, "datatype", "") != "BYTES":
        return []
    texts = [b.decode("utf-8", "replace") for b in tensor.contents.bytes_contents]
    raw = getattr(request, "raw_input_contents", ())
    if index < len(raw):
        texts.extend(b.decode("utf-8", "replace") for b in _raw_elements(raw[index]) or ())
    return texts


def _bytes_texts(request: Any) -> list[str]:
    return [t for i in range(len(getattr(request, "inputs", ()) or ())) for t in _tensor_texts(request, i)]


def _element_fn(fn: Callable[[str], str]) -> Callable[[bytes], bytes]:
    """A text rule applied to one BYTES element. Bytes that are not UTF-8 survive unchanged
    (surrogate escapes), while the text around them is still inspected."""
    def apply(b: bytes) -> bytes:
        text = b.decode("utf-8", "surrogateescape")
        out = fn(text)
        return b if out == text else out.encode("utf-8", "surrogateescape")
    return apply


def map_bytes_tensors(tensors: Any, raw: Any, fn: Callable[[str, str], str]) -> None:
    """Rewrite, in place, every element of the BYTES tensors of a ModelInferRequest (``inputs``
    and ``raw_input_contents``) or ModelInferResponse (``outputs`` and ``raw_output_contents``)
    with ``fn(tensor name, text)``."""
    for i, tensor in enumerate(tensors):
        if tensor.datatype != "BYTES":
            continue
        apply = _element_fn(functools.partial(fn, tensor.name))
        values = tensor.contents.bytes_contents
        if len(values):
            new = [apply(b) for b in values]
            del values[:]
            values.extend(new)
        if i < len(raw):
            elements = _raw_elements(raw[i])
            if elements:
                raw[i] = _raw_blob([apply(e) for e in elements])


def _offered_tools(request: Any) -> list[str] | None:
    """The tool names of a generation request's ``tools`` input (one BYTES element holding a
    JSON array), if it has one. Anything else in ``tools`` is refused when the request is
    parsed, before it reaches the model."""
    for i, tensor in enumerate(request.inputs):
        if tensor.name == "tools":
            texts = _tensor_texts(request, i)
            try:
                return tool_names(json.loads(texts[0])) if len(texts) == 1 else None
            except ValueError:
                return None
    return None


def check_infer_rules(spec: ModelSpec | None, request: Any) -> None:
    """The model's content policy on a gRPC inference request (5001): size, deny patterns over
    the BYTES elements, and ``allowed_tools`` over a generation request's ``tools`` input."""
    if spec is None or spec.policy is None:
        return
    size = request.ByteSize() if hasattr(request, "ByteSize") else 0
    tools = _offered_tools(request) if spec.policy.allowed_tools is not None else None
    check_policy(spec.policy, spec.name, size=size, texts=_bytes_texts(request), tools=tools)


class PiiExchange:
    """PII redaction for one RPC: BYTES inputs get numbered placeholders before the model sees
    them and BYTES outputs get the originals back (or PII masked), by each model's ``pii:``
    rules, as on REST. The requests of one stream share one vault, so an answer is restored
    whichever request it belongs to (up to the last ``STREAM_VAULT_LIMIT`` values redacted,
    so a long-lived stream's memory stays bounded); streamed ``text_output`` pieces (generation)
    are joined where a placeholder is split between them, per request id."""

    STREAM_VAULT_LIMIT = 4096

    def __init__(self, spec_for: Callable[[str], ModelSpec | None]) -> None:
        self._spec_for = spec_for
        self.vault = Vault(limit=self.STREAM_VAULT_LIMIT)
        self._rules: dict[str, PiiRules | None] = {}
        self._pieces: dict[str, PieceTexts] = {}

    def rules(self, model: str) -> PiiRules | None:
        if model not in self._rules:
            spec = self._spec_for(model)
            pii = spec.pii if spec is not None else None
            self._rules[model] = PiiRules(pii, self.vault) if pii is not None else None
        return self._rules[model]

    def redact_request(self, call: Call, request: Any) -> None:
        rules = self.rules(request.model_name)
        if rules is None or not rules.spec.inputs:
            return
        before = len(self.vault.originals)
        map_bytes_tensors(request.inputs, request.raw_input_contents, lambda _name, text: rules.redact_input(text))
        if len(self.vault.originals) > before:
            call.detail["pii_redacted"] = len(self.vault.originals)

    def render(self, response: Any) -> None:
        """A ModelInferResponse, or a ModelStreamInferResponse (one piece of a generation)."""
        stream = hasattr(response, "error_message")
        msg = response.infer_response if stream else response
        rules = self.rules(msg.model_name) if msg.model_name else None
        if rules is None or not rules.changes_outputs:
            return
        pieces = self._pieces.get(msg.model_name)
        if stream and response.error_message:
            if pieces is not None:
                pieces.drop(msg.id)
            return
        if "triton_final_response" not in msg.parameters:  # a whole answer, not a piece of one
            map_bytes_tensors(msg.outputs, msg.raw_output_contents, lambda _name, text: rules.output(text))
            return
        if pieces is None:
            pieces = self._pieces[msg.model_name] = PieceTexts(rules.output)
        final = msg.parameters["triton_final_response"].bool_param
        map_bytes_tensors(msg.outputs, msg.raw_output_contents, lambda name, text: pieces.piece(
            msg.id, text, final) if name == "text_output" else rules.output(text))
        if final:
            pieces.drop(msg.id)


class SecurityInterceptor(CachedWrapInterceptor):
    def __init__(self, gate: SecurityGate) -> None:
        super().__init__()
        self.gate = gate

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        action, scope, model_field = classify_grpc(method)
        if scope == "open":
            return handler
        gate = self.gate

        def new_call(context: grpc.aio.ServicerContext) -> Call:
            md = _metadata(context.invocation_metadata())
            ctx = current_request()  # the observability interceptor's request id and trace, when it runs
            return Call(transport="grpc", action=action, scope=scope, peer=peer_address(context.peer()),
                        forwarded_for=md.get("x-forwarded-for"), credential=_credential(md),
                        request_id=ctx.request_id if ctx else new_request_id(md.get("x-request-id")),
                        trace_id=ctx.trace_id if ctx else None)

        async def deny(call: Call, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            err = as_inhouse_error(exc)
            await gate.record(call, err.http_status, err.code, err.message)
            await grpc_abort(context, err)

        def check_message(call: Call, request: Any, exchange: PiiExchange | None) -> PiiExchange | None:
            """The key's model list, the model's content policy, then its PII rules (the request
            is redacted in place; the exchange, new when needed, restores the answer)."""
            model = getattr(request, model_field, None) if model_field else None
            if isinstance(model, str) and model:
                gate.check_model(call, model)
                if action.startswith("infer"):
                    spec = gate.spec_for(model)
                    check_infer_rules(spec, request)
                    if spec is not None and spec.pii is not None:
                        exchange = exchange or PiiExchange(gate.spec_for)
                        exchange.redact_request(call, request)
            elif action == "model.statistics":
                gate.check_all_models(call)
            return exchange

        async def admitted(context: grpc.aio.ServicerContext, request: Any = None) -> tuple[Call, PiiExchange | None]:
            """A new call admitted by the gate and, given the RPC's one request message, checked
            against the key's models and the model's rules; a refusal is audited and aborts the RPC."""
            call = new_call(context)
            exchange = None
            try:
                gate.admit(call)
                if request is not None:
                    exchange = check_message(call, request, None)
            except Exception as exc:
                await deny(call, context, exc)
            return call, exchange

        async def finish(call: Call, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
            if call.recorded:
                return
            if exc is None:
                await gate.record(call, 200, None)
                return
            if isinstance(exc, InhouseError):
                await gate.record(call, exc.http_status, exc.code, exc.message)
                return
            code = context.code() if hasattr(context, "code") else None
            await gate.record(call, 200 if code in (None, grpc.StatusCode.OK) else 500, None,
                        None if code is None else f"gRPC status {code}")

        def rules_apply(request: Any) -> bool:
            """Whether a call on a server with nothing to admit or audit (``gate.active`` false:
            no keys, audit, allow-list or address rate limit) still has checks to run: the
            model's own content policy and PII rules, on inference."""
            if model_field is None or not action.startswith("infer"):
                return False
            spec = gate.spec_for(getattr(request, model_field, None) or None)
            return spec is not None and (spec.policy is not None or spec.pii is not None)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not gate.active and not rules_apply(request):
                    # every check would pass and nothing would be recorded: skip building the call
                    result = inner_uu(request, context)
                    return await result if hasattr(result, "__await__") else result
                call, exchange = await admitted(context, request)
                try:
                    result = inner_uu(request, context)
                    if hasattr(result, "__await__"):
                        result = await result
                    if exchange is not None:
                        exchange.render(result)
                except BaseException as exc:
                    await finish(call, context, exc)
                    raise
                await finish(call, context, None)
                return result

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call, exchange = await admitted(context, request)
                await finish(call, context, None)  # committed before the first response message
                async for item in inner_us(request, context):
                    if exchange is not None:
                        exchange.render(item)
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        inner_stream = handler.stream_stream or handler.stream_unary

        class _Stream:
            """The messages of one client-streaming RPC, checked one by one."""

            def __init__(self, call: Call) -> None:
                self.call = call
                self.exchange: PiiExchange | None = None

            async def checked(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
                async for req in requests:
                    try:
                        self.exchange = check_message(self.call, req, self.exchange)
                    except InhouseError as exc:
                        # audited as its own entry (the stream's was committed when it opened);
                        # the stream then ends with the error (4003, 5001)
                        blocked = dataclasses.replace(self.call, recorded=False, started=time.perf_counter(),
                                                      detail={})
                        await gate.record(blocked, exc.http_status, exc.code, exc.message)
                        raise
                    yield req

            def render(self, item: Any) -> None:
                if self.exchange is not None:
                    self.exchange.render(item)

        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                    ) -> AsyncIterator[Any]:
                call, _ = await admitted(context)
                await finish(call, context, None)
                stream = _Stream(call)
                try:
                    async for item in inner_ss(stream.checked(requests), context):
                        stream.render(item)
                        yield item
                except InhouseError as exc:
                    await grpc_abort(context, exc)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        if inner_stream is None:
            return handler
        inner_su = inner_stream

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            call, _ = await admitted(context)
            try:
                stream = _Stream(call)
                result = await inner_su(stream.checked(requests), context)
                stream.render(result)
            except BaseException as exc:
                await finish(call, context, exc)
                raise
            await finish(call, context, None)
            return result

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
