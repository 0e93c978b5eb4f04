"""The KServe v2 gRPC path against raw onnxruntime, measured in the same run.

    python bench/bench_grpc.py                          # mlp and dense, concurrency 1,8,32
    python bench/bench_grpc.py --models mlp --concurrency 1,8,32,64 --duration 10

Reference: the same ONNX model in this process, ``session.run`` at batch 1, one call after
another (raw calls/s and p50). Server: ``inhouse serve`` in a subprocess; the load generator
(this process) runs ``concurrency`` closed-loop callers on one grpc.aio channel, each sending
the same pre-built ``ModelInferRequest`` with ``raw_input_contents`` (what tritonclient and
perf_analyzer send) and reading ``raw_output_contents``. Reported per point: requests/s,
p50 / p99 latency, ``ratio_to_raw`` (server requests/s ÷ raw calls/s) and ``p50_minus_raw_ms``
(what the transport, data plane and scheduling add to one call), and the server process's
CPU time per request (steadier than requests/s on a shared machine).

Models, built with onnx.helper and random weights (no download):
* ``mlp`` (overhead-bound): FP32 [batch, 32] → 64 → 2, softmax.
* ``dense`` (compute-bound): FP32 [batch, 512] through 8 MatMul + Relu layers of 512 × 512.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper

from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc


def _finish(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], name: str) -> bytes:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def mlp_model(features: int = 32, hidden: int = 64, classes: int = 2) -> bytes:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32) * 0.1, "w2"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["z"]), helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    return _finish(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])], inits, "mlp")


def dense_model(width: int = 512, layers: int = 8) -> bytes:
    rng = np.random.default_rng(1)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.05, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return _finish(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits, "dense")


MODELS = {"mlp": (mlp_model, 32), "dense": (dense_model, 512)}


def raw_reference(model: bytes, x: np.ndarray, seconds: float) -> dict[str, float]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feed = {"x": x}
    for _ in range(20):
        sess.run(None, feed)
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(None, feed)
        lat.append(time.perf_counter() - t0)
    return {"rps": len(lat) / sum(lat), "p50_ms": statistics.median(lat) * 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def serve(repo: Path) -> Iterator[tuple[str, int]]:
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "INHOUSE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo),
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--data-dir", str(repo.parent / "data")],
        env=env,
    )
    target = f"127.0.0.1:{grpc_port}"
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                        break
                except grpc.RpcError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("inhouse serve did not become ready")
                time.sleep(0.2)
        yield target, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


async def load(target: str, request: Any, concurrency: int, seconds: float, warmup: float,
               server_pid: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as ch:
        infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        lat: list[float] = []
        measuring = False
        stop_at = time.perf_counter() + warmup + seconds

        async def caller() -> None:
            while (now := time.perf_counter()) < stop_at:
                await infer(request)
                if measuring:
                    lat.append(time.perf_counter() - now)

        cpu: list[float] = []

        async def clock() -> None:
            nonlocal measuring
            await asyncio.sleep(warmup)
            measuring = True
            cpu.append(process_cpu_s(server_pid))
            await asyncio.sleep(seconds)
            cpu.append(process_cpu_s(server_pid))

        t_clock = asyncio.create_task(clock())
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        await t_clock
    lat.sort()
    return {"rps": len(lat) / seconds, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "server_cpu_us_per_req": (cpu[1] - cpu[0]) / max(len(lat), 1) * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,dense")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.models.split(",")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        built: dict[str, tuple[bytes, np.ndarray]] = {}
        for name in names:
            build, width = MODELS[name]
            onnx_bytes = build()
            (repo / name / "1").mkdir(parents=True)
            (repo / name / "1" / "model.onnx").write_bytes(onnx_bytes)
            (repo / name / "model.yaml").write_text(yaml.safe_dump({"name": name, "backend": "onnxruntime"}))
            built[name] = (onnx_bytes, np.random.default_rng(2).standard_normal((1, width)).astype(np.float32))
        with serve(repo) as (target, server_pid):
            for name in names:
                onnx_bytes, x = built[name]
                raw = raw_reference(onnx_bytes, x, args.duration)
                print(f"{name:6} raw onnxruntime batch 1: {raw['rps']:9.0f} calls/s  p50 {raw['p50_ms']:.3f} ms",
                      flush=True)
                req = pb.ModelInferRequest(model_name=name)
                req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
                req.raw_input_contents.append(x.tobytes())
                for c in levels:
                    r = asyncio.run(load(target, req, c, args.duration, args.warmup, server_pid))
                    row = {"model": name, "transport": "grpc", "concurrency": c,
                           **{k: round(v, 3) for k, v in r.items()},
                           "raw_rps": round(raw["rps"], 1), "raw_p50_ms": round(raw["p50_ms"], 4),
                           "ratio_to_raw": round(r["rps"] / raw["rps"], 3),
                           "p50_minus_raw_ms": round(r["p50_ms"] - raw["p50_ms"], 3)}
                    results.append(row)
                    print(f"{name:6} grpc c={c:<3} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                          f"p99 {r['p99_ms']:.3f} ms  ratio_to_raw {row['ratio_to_raw']:.3f}  "
                          f"p50-raw {row['p50_minus_raw_ms']:.3f} ms  "
                          f"server CPU {r['server_cpu_us_per_req']:.0f} us/req", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
