"""The gRPC transport for the load generator of the scheduling benchmarks
(``bench/loadgen.py --transport grpc``, ``bench/run.py --transport rest,grpc``): the same
request the REST transport sends (v2 header + binary tensor data), as a KServe v2
``ModelInferRequest`` with ``raw_input_contents``, from ``concurrency`` closed-loop callers
on one grpc.aio channel. ``bench/bench_grpc.py`` is the self-contained gRPC benchmark."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections import Counter
from typing import Any

import grpc

from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc

# bench/loadgen.py (the scheduling benchmarks' load generator), imported by name so that this
# file lints the same before and after it lands beside it.
loadgen = importlib.import_module("loadgen")


def grpc_request(model: str, payload: dict[str, Any]) -> Any:
    """The payload's v2 header and binary blob as a ModelInferRequest (raw contents)."""
    blob = bytes.fromhex(str(payload.get("binary_hex", "")))
    req = pb.ModelInferRequest(model_name=model)
    offset = 0
    for t in payload["header"]["inputs"]:
        size = t["parameters"]["binary_data_size"]
        req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        req.raw_input_contents.append(blob[offset:offset + size])
        offset += size
    return req


async def run_grpc(args: argparse.Namespace, payload: dict[str, Any]) -> Any:
    request = grpc_request(args.model, payload)
    # --header 'Name: value' becomes call metadata (e.g. 'Authorization: Bearer KEY')
    metadata = tuple((name.strip().lower(), value.strip())
                     for name, _, value in (h.partition(":") for h in args.header))
    target = str(args.url).removeprefix("grpc://").removeprefix("http://")
    start = time.perf_counter()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    meter = loadgen.schedule_cpu_marks(args)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    def note(t0: float, code: str) -> None:
        if t0 >= measure_from:
            statuses[code] += 1
            if code == "OK":
                latencies.append(time.perf_counter() - t0)

    if args.concurrency == 1:
        # one caller: grpcio's blocking stub, which waits inside grpc's C core. The aio client
        # costs ~0.5 ms of CPU per call, on the same cores as the server (enough to slow a model
        # whose onnxruntime threads use both).
        with grpc.insecure_channel(target) as sync_channel:
            sync_infer = pb_grpc.GRPCInferenceServiceStub(sync_channel).ModelInfer

            def blocking_caller() -> None:
                while (t0 := time.perf_counter()) < stop_at:
                    try:
                        sync_infer(request, metadata=metadata)
                        code = "OK"
                    except grpc.RpcError as err:
                        code = err.code().name  # type: ignore[attr-defined]  # grpc's call errors have it
                    note(t0, code)

            await asyncio.to_thread(blocking_caller)
    else:
        async with grpc.aio.insecure_channel(target) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            async def caller() -> None:
                while (t0 := time.perf_counter()) < stop_at:
                    try:
                        await infer(request, metadata=metadata)
                        code = "OK"
                    except grpc.aio.AioRpcError as err:
                        code = err.code().name
                    note(t0, code)

            await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    errors = sum(n for code, n in statuses.items() if code != "OK")
    return meter.apply(loadgen.summarize("grpc", args.concurrency, args.duration, latencies, errors, dict(statuses)))


loadgen.TRANSPORTS["grpc"] = run_grpc
# loadgen.py runs as __main__, so `import loadgen` above is a second copy of it: register there too.
_main = sys.modules.get("__main__")
if _main is not None and isinstance(getattr(_main, "TRANSPORTS", None), dict):
    _main.TRANSPORTS["grpc"] = run_grpc
