"""The gRPC edge of the security layer: a grpc.aio server interceptor that runs the same
:class:`~inhouse.security.gate.SecurityGate` checks as the HTTP middleware (API key from the
``authorization: Bearer`` or ``x-api-key`` metadata, client address from the peer) and commits
the audit entry before the response is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from inhouse.core.spec import ModelSpec
from inhouse.errors import InhouseError, PolicyBlockedError
from inhouse.observability.context import current as current_request
from inhouse.protocols.errors import ERROR_CODE_HEADER, as_inhouse_error
from inhouse.security.gate import Call, Scope, SecurityGate, new_request_id
from inhouse.security.policy import check_policy

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


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    md = getattr(details, "invocation_metadata", None) or ()
    return {k.lower(): v for k, v in md if isinstance(v, str)}


def _credential(md: dict[str, str]) -> str | None:
    auth = md.get("authorization")
    if auth:
        kind, _, value = auth.partition(" ")
        return value.strip() if kind.lower() == "bearer" else None
    return md.get("x-api-key")


def _bytes_texts(request: Any) -> list[str]:
    """The BYTES tensor elements of a ModelInferRequest, as text (typed contents and raw)."""
    texts: list[str] = []
    raw = list(getattr(request, "raw_input_contents", ()) or ())
    for i, tensor in enumerate(getattr(request, "inputs", ()) or ()):
        if getattr(tensor, "datatype", "") != "BYTES":
            continue
        texts.extend(b.decode("utf-8", "replace") for b in tensor.contents.bytes_contents)
        if i < len(raw):
            blob, pos = raw[i], 0
            while pos + 4 <= len(blob):
                n = int.from_bytes(blob[pos:pos + 4], "little")
                texts.append(blob[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
                pos += 4 + n
    return texts


def check_infer_rules(spec: ModelSpec | None, request: Any) -> None:
    """The model's content policy on a gRPC inference request (5001). PII redaction rewrites
    requests on the HTTP routes only: a model that asks for it refuses gRPC inference rather
    than let PII reach it."""
    if spec is None:
        return
    if spec.pii is not None and spec.pii.inputs:
        raise PolicyBlockedError(f"Model '{spec.name}' redacts PII from its inputs, which inhouse does on the HTTP "
                                 "routes only; call it over REST.")
    if spec.policy is not None:
        size = request.ByteSize() if hasattr(request, "ByteSize") else 0
        check_policy(spec.policy, spec.name, size=size, texts=_bytes_texts(request))


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: SecurityGate) -> None:
        self.gate = gate

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        action, scope, model_field = classify_grpc(method)
        if scope == "open":
            return handler
        md = _metadata(handler_call_details)
        gate = self.gate

        def new_call(context: grpc.aio.ServicerContext) -> Call:
            ctx = current_request()  # the observability interceptor's request id and trace, when it runs
            return Call(transport="grpc", action=action, scope=scope, peer=peer_address(context.peer()),
                        forwarded_for=md.get("x-forwarded-for"), credential=_credential(md),
                        request_id=ctx.request_id if ctx else new_request_id(md.get("x-request-id")),
                        trace_id=ctx.trace_id if ctx else None)

        async def deny(call: Call, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            err = as_inhouse_error(exc)
            await gate.record(call, err.http_status, err.code, err.message)
            await context.abort(grpc.StatusCode[err.grpc_status], str(err),
                                trailing_metadata=((ERROR_CODE_HEADER, str(err.code)),))

        def check_message(call: Call, request: Any) -> None:
            model = getattr(request, model_field, None) if model_field else None
            if isinstance(model, str) and model:
                gate.check_model(call, model)
                if action.startswith("infer"):
                    check_infer_rules(gate.spec_for(model), request)
            elif action == "model.statistics":
                gate.check_all_models(call)

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

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = new_call(context)
                try:
                    await gate.admit(call)
                    check_message(call, request)
                except Exception as exc:
                    await deny(call, context, exc)
                try:
                    result = inner_uu(request, context)
                    if hasattr(result, "__await__"):
                        result = await result
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
                call = new_call(context)
                try:
                    await gate.admit(call)
                    check_message(call, request)
                except Exception as exc:
                    await deny(call, context, exc)
                await finish(call, context, None)  # committed before the first response message
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        inner_stream = handler.stream_stream or handler.stream_unary

        async def checked(call: Call, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for req in requests:
                check_message(call, req)  # a model the key may not use ends the stream with 4003
                yield req

        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                    ) -> AsyncIterator[Any]:
                call = new_call(context)
                try:
                    await gate.admit(call)
                except Exception as exc:
                    await deny(call, context, exc)
                await finish(call, context, None)
                try:
                    async for item in inner_ss(checked(call, requests), context):
                        yield item
                except InhouseError as exc:
                    await context.abort(grpc.StatusCode[exc.grpc_status], str(exc),
                                        trailing_metadata=((ERROR_CODE_HEADER, str(exc.code)),))

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)

        if inner_stream is None:
            return handler
        inner_su = inner_stream

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            call = new_call(context)
            try:
                await gate.admit(call)
            except Exception as exc:
                await deny(call, context, exc)
            try:
                result = await inner_su(checked(call, requests), context)
            except BaseException as exc:
                await finish(call, context, exc)
                raise
            await finish(call, context, None)
            return result

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
