"""inhouse's gRPC interceptors applied when the services register (WrappingRegistrar) instead
of per call: the same order as grpc's interceptor pipeline, each handler wrapped once. The real
front end registers this way; its interceptors' behaviour is tested in test_grpc_errors.py
(limits), test_grpc_kserve.py / test_grpc_metrics.py (metrics, trace context) and
test_security*.py (auth, audit, PII, policy)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from inhouse.transports.grpc.intercept import CachedWrapInterceptor, WrappingRegistrar

SERVICE = "inference.GRPCInferenceService"


class Recording(CachedWrapInterceptor):
    """Appends its name to ``log`` when a call enters it; counts how often it wraps."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log, self.wraps = name, log, 0

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        self.wraps += 1
        inner: Callable[[Any, Any], Awaitable[Any]] = handler.unary_unary

        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            self.log.append(f"{self.name}:{method.rsplit('/', 1)[-1]}")
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


async def _calls(register: Callable[[aio.Server], None], interceptors: list[Any] | None) -> None:
    server = aio.server(interceptors=interceptors)
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            for _ in range(3):
                assert await ch.unary_unary(f"/{SERVICE}/ModelInfer")(b"ab") == b"ba"
            with pytest.raises(aio.AioRpcError) as err:
                await ch.unary_unary(f"/{SERVICE}/Nope")(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


def _handlers() -> grpc.GenericRpcHandler:
    async def reverse(request: bytes, context: aio.ServicerContext) -> bytes:
        return request[::-1]

    return grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(reverse)})


def test_registrar_runs_interceptors_in_pipeline_order_and_wraps_once() -> None:
    piped: list[str] = []
    outer, inner = Recording("outer", piped), Recording("inner", piped)
    asyncio.run(_calls(lambda s: s.add_generic_rpc_handlers((_handlers(),)), [outer, inner]))

    registered: list[str] = []
    outer2, inner2 = Recording("outer", registered), Recording("inner", registered)
    asyncio.run(_calls(lambda s: WrappingRegistrar(s, [outer2, inner2]).add_generic_rpc_handlers((_handlers(),)),
                       None))
    assert registered == piped == ["outer:ModelInfer", "inner:ModelInfer"] * 3
    assert (outer2.wraps, inner2.wraps) == (1, 1)  # once for the method, not per call


def test_registrar_wraps_registered_method_handlers() -> None:
    log: list[str] = []
    rec = Recording("rec", log)

    def register(server: aio.Server) -> None:
        WrappingRegistrar(server, [rec]).add_registered_method_handlers(SERVICE, {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(_reverse)})

    asyncio.run(_calls(register, None))
    assert log == ["rec:ModelInfer"] * 3 and rec.wraps == 1


async def _reverse(request: bytes, context: aio.ServicerContext) -> bytes:
    return request[::-1]
