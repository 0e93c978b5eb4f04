"""The gRPC interceptor on a real grpc.aio server: grpc_server_* metrics, trace context."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inhouse.observability.context import current, parse_traceparent
from inhouse.observability.metrics import Metrics
from inhouse.transports.grpc.observability import GrpcObservabilityInterceptor

SERVICE = "inference.GRPCInferenceService"


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_interceptor_counts_rpcs_by_code(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    metrics = Metrics()
    seen: list[str | None] = []

    async def ok(request: bytes, context: aio.ServicerContext) -> bytes:
        ctx = current()
        seen.append(ctx.trace_id if ctx else None)
        return request[::-1]

    async def bad(request: bytes, context: aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "[2001] bad")
        return b""

    async def stream(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i])

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(ok),
        "ModelMetadata": grpc.unary_unary_rpc_method_handler(bad),
        "ModelStreamInfer": grpc.unary_stream_rpc_method_handler(stream),
    })
    server = aio.server(interceptors=[GrpcObservabilityInterceptor(metrics.grpc)])
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            infer = ch.unary_unary(f"/{SERVICE}/ModelInfer")
            call = infer(b"abc", metadata=(("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),))
            assert await call == b"cba"
            trailing = dict(await call.trailing_metadata())
            parsed = parse_traceparent(trailing["traceparent"])
            assert parsed is not None and parsed[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
            assert await infer(b"x") == b"x"
            with pytest.raises(aio.AioRpcError) as err:
                await ch.unary_unary(f"/{SERVICE}/ModelMetadata")(b"")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            got = [m async for m in ch.unary_stream(f"/{SERVICE}/ModelStreamInfer")(b"")]
            assert got == [b"\x00", b"\x01", b"\x02"]
    finally:
        await server.stop(None)

    assert seen[0] == "4bf92f3577b34da6a3ce929d0e0e4736" and seen[1] not in (None, seen[0])
    s = _samples(metrics)

    def v(name: str, **labels: str) -> float:
        return sum(val for (n, ls), val in s.items() if n == name and set(labels.items()) <= ls)

    assert v("grpc_server_started_total", grpc_method="ModelInfer", grpc_type="unary") == 2
    assert v("grpc_server_handled_total", grpc_service=SERVICE, grpc_method="ModelInfer", grpc_code="OK") == 2
    assert v("grpc_server_handled_total", grpc_method="ModelMetadata", grpc_code="INVALID_ARGUMENT") == 1
    assert v("grpc_server_handled_total", grpc_method="ModelStreamInfer", grpc_type="server_stream",
             grpc_code="OK") == 1
    assert v("grpc_server_msg_sent_total", grpc_method="ModelStreamInfer") == 3
    assert v("grpc_server_handling_seconds_count", grpc_method="ModelInfer") == 2
    rpcs = [r for r in caplog.records if r.name == "inhouse.access" and r.getMessage() == "rpc"]
    assert len(rpcs) == 4 and {r.grpc_code for r in rpcs} == {"OK", "INVALID_ARGUMENT"}  # type: ignore[attr-defined]
