"""Request messages that are not the RPC's protobuf. grpcio decodes each message before any
handler or interceptor runs, and a decode error there ends the call as UNKNOWN (unary) or
INTERNAL (streams), as if the server had failed. This interceptor gives every handler a
deserializer that never raises: bytes it cannot decode become an :class:`Undecodable`, which
the wrapped handler turns into INVALID_ARGUMENT (code 2001) before anything else reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from inhouse.errors import InvalidRequestError
from inhouse.protocols.errors import grpc_abort
from inhouse.transports.grpc.intercept import CachedWrapInterceptor, RpcKind, Streaming, Unary


class Undecodable:
    """Stands for a request message whose bytes did not decode."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def undecodable_error(method: str, size: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"The request message ({size} bytes) is not a valid protobuf message for {method}; "
        "send a message serialized from the RPC's request type."
    )


def guarded(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            return Undecodable(len(data))
        except Exception:
            # protobuf raises more than DecodeError for some inputs (too deep, bad UTF-8);
            # bytes that do not parse are the client's fault, never the server's
            return Undecodable(len(data))

    return decode


class DecodeGuardInterceptor(CachedWrapInterceptor):
    """Sits inside the observability interceptor (so refusals are counted) and outside the
    security one (which reads fields of the request)."""

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        wrapped = super()._wrap(handler, method)
        return wrapped._replace(request_deserializer=guarded(handler.request_deserializer))

    def _unary(self, behavior: Unary, method: str, kind: RpcKind) -> Unary:
        if kind.client_streaming:

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(_checked(requests, method), context)
                except InvalidRequestError as exc:
                    await grpc_abort(context, exc)

            return stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await grpc_abort(context, undecodable_error(method, request.size))
            result = behavior(request, context)
            return await result if hasattr(result, "__await__") else result

        return unary

    def _streaming(self, behavior: Streaming, method: str, kind: RpcKind) -> Streaming:
        if kind.client_streaming:

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(_checked(requests, method), context):
                        yield item
                except InvalidRequestError as exc:
                    await grpc_abort(context, exc)

            return stream_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await grpc_abort(context, undecodable_error(method, request.size))
            async for item in behavior(request, context):
                yield item

        return unary_stream


async def _checked(requests: Any, method: str) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise undecodable_error(method, request.size)
        yield request
