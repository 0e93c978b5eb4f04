"""The shape every inhouse grpc.aio interceptor shares: wrap a method's handler once and reuse
the wrapper for every later call of that method (building handlers and closures per RPC costs
more than the checks they run). Subclasses say how to wrap in ``_wrap``.

The same wrappers can be applied when the services register instead of on each call
(:class:`WrappingRegistrar`): the gRPC front end does that, so no interceptor pipeline (one
coroutine per interceptor and a handler lookup per RPC) runs on the hot path at all.

The four kinds of RPC are told apart here, once: an interceptor writes one wrapper for the
RPCs that answer with one message (``_unary``: unary-unary, stream-unary) and one for those
that stream their answers (``_streaming``: unary-stream, stream-stream); the :class:`RpcKind`
it gets says whether the request is one message or a stream of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import grpc
import grpc.aio


class RpcKind(NamedTuple):
    label: str  # the ``grpc_type`` label of the grpc_server_* metrics
    client_streaming: bool


UNARY = RpcKind("unary", False)
SERVER_STREAM = RpcKind("server_stream", False)
CLIENT_STREAM = RpcKind("client_stream", True)
BIDI_STREAM = RpcKind("bidi_stream", True)

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
"""A handler answering one message; its first argument is the request, or the request stream."""
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
"""A handler streaming its answers."""


def rewrap(handler: grpc.RpcMethodHandler, unary: Callable[[Unary, RpcKind], Unary],
           streaming: Callable[[Streaming, RpcKind], Streaming]) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped by ``unary`` or ``streaming``, by its kind."""
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, UNARY), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream, SERVER_STREAM), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, CLIENT_STREAM), **codec)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, BIDI_STREAM), **codec)
    return handler


class CachedWrapInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no stubs
    def __init__(self) -> None:
        # method -> (the handler it wraps, the wrapper): built once per method, not per call
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.wrap(handler, handler_call_details.method)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """``handler`` of the full method name ``method`` with this interceptor's work around it."""
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        return rewrap(handler, lambda behavior, kind: self._unary(behavior, method, kind),
                      lambda behavior, kind: self._streaming(behavior, method, kind))

    def _unary(self, behavior: Unary, method: str, kind: RpcKind) -> Unary:
        raise NotImplementedError

    def _streaming(self, behavior: Streaming, method: str, kind: RpcKind) -> Streaming:
        raise NotImplementedError


def wrap_handler(handler: grpc.RpcMethodHandler, method: str,
                 interceptors: Sequence[CachedWrapInterceptor]) -> grpc.RpcMethodHandler:
    """``handler`` wrapped by ``interceptors``, outermost first: what the interceptor pipeline
    would run for ``method``, built once."""
    for interceptor in reversed(interceptors):
        handler = interceptor.wrap(handler, method)
    return handler


class _WrappedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no stubs
    def __init__(self, inner: grpc.GenericRpcHandler, interceptors: Sequence[CachedWrapInterceptor]) -> None:
        self._inner = inner
        self._interceptors = interceptors

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, handler_call_details.method, self._interceptors)  # cached per method


class WrappingRegistrar:
    """Stands in for a grpc.aio server while services register (``add_XServicer_to_server``,
    health, reflection): every method handler is wrapped by ``interceptors`` (outermost first)
    there, once, and handed to the server. Calls then reach the wrapped handlers directly."""

    def __init__(self, server: Any, interceptors: Sequence[CachedWrapInterceptor]) -> None:
        self._server = server
        self._interceptors = tuple(interceptors)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._interceptors) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(service, {
            name: wrap_handler(h, f"/{service}/{name}", self._interceptors) for name, h in handlers.items()})
