"""The shape every inhouse grpc.aio interceptor shares: wrap a method's handler once and reuse
the wrapper for every later call of that method (building handlers and closures per RPC costs
more than the checks they run). Subclasses say how to wrap in ``_wrap``.

The same wrappers can be applied when the services register instead of on each call
(:class:`WrappingRegistrar`): the gRPC front end does that, so no interceptor pipeline (one
coroutine per interceptor and a handler lookup per RPC) runs on the hot path at all."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio


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
