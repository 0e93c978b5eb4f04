"""A gRPC server interceptor that caps concurrent calls (``grpc.max_concurrent_rpcs``). A call
over the cap is refused at once with RESOURCE_EXHAUSTED and code 3004 rather than queued, so
clients back off instead of piling up. Health checks and reflection are never refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from inhouse.errors import ConcurrencyLimitError
from inhouse.protocols.errors import grpc_error
from inhouse.transports.grpc.intercept import CachedWrapInterceptor, RpcKind, Streaming, Unary

EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ConcurrencyLimitInterceptor(CachedWrapInterceptor):
    def __init__(self, limit: int, exempt: tuple[str, ...] = EXEMPT_PREFIXES) -> None:
        super().__init__()
        self.limit = limit
        self.active = 0
        self._exempt = exempt

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.active >= self.limit:
            code, details, metadata = grpc_error(ConcurrencyLimitError(
                f"The server is already handling its limit of {self.limit} concurrent gRPC calls "
                "(grpc.max_concurrent_rpcs); retry shortly.", headers={"retry-after": "1"}))
            await context.abort(code, details, trailing_metadata=metadata)
        self.active += 1

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if method.startswith(self._exempt):
            return handler
        return super()._wrap(handler, method)

    def _unary(self, behavior: Unary, method: str, kind: RpcKind) -> Unary:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._enter(context)
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1
        return unary

    def _streaming(self, behavior: Streaming, method: str, kind: RpcKind) -> Streaming:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._enter(context)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self.active -= 1
        return streaming
