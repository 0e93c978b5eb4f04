"""The shape every inhouse grpc.aio interceptor shares: wrap a method's handler once and reuse
the wrapper for every later call of that method (building handlers and closures per RPC costs
more than the checks they run). Subclasses say how to wrap in ``_wrap``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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
        method = handler_call_details.method
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError
