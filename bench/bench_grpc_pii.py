"""Cost of PII redaction and the content policy on gRPC ModelInfer: the same identity model
(BYTES in, BYTES out) served twice by one server, plain and with ``pii: {inputs: true,
outputs: restore}`` plus a deny pattern, called alternately in the same run at concurrency 1
with a text holding a phone number and an e-mail address (raw_input_contents, as tritonclient
sends). Also the interceptor's own CPU time per request for the PII work, in process.

    python bench/bench_grpc_pii.py [--requests 2000] [--rounds 3]

Prints p50 / p99 latency for both models, the difference, and the in-process CPU cost."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import yaml
from onnx import TensorProto, helper

from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc

TEXT = "Please call the customer at 13800138000 or write to wang.wei@example.cn about the loan."


def make_repo(root: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "echo", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rules = {"pii": {"inputs": True, "outputs": "restore"},
             "policy": {"deny_patterns": ["(?i)ignore previous instructions"]}}
    for name, extra in (("echo-plain", {}), ("echo-pii", rules)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(model.SerializeToString())
        (root / name / "model.yaml").write_text(yaml.safe_dump({"name": name, "backend": "onnxruntime", **extra}))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(model: str) -> pb.ModelInferRequest:
    data = TEXT.encode()
    return pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="BYTES", shape=[1, 1])], raw_input_contents=[len(data).to_bytes(4, "little") + data])


def latency(stub: pb_grpc.GRPCInferenceServiceStub, model: str, n: int) -> list[float]:
    req, times = request(model), []
    for _ in range(n):
        t = time.perf_counter()
        resp = stub.ModelInfer(req)
        times.append(time.perf_counter() - t)
        if resp.raw_output_contents[0][4:] != TEXT.encode():
            raise RuntimeError(f"{model} answered {resp.raw_output_contents[0]!r}")
    return times


def micro(n: int) -> float:
    """CPU microseconds per request of redacting the request and restoring the response."""
    from inhouse.core.spec import ModelSpec
    from inhouse.protocols.kserve_v2.grpc_service import TEXTS
    from inhouse.security.gate import Call
    from inhouse.security.pipeline import Exchange

    spec = ModelSpec.model_validate({"name": "echo-pii", "backend": "onnxruntime",
                                     "pii": {"inputs": True, "outputs": "restore"}})
    t = time.process_time()
    for _ in range(n):
        req = request("echo-pii")
        exchange = Exchange(lambda model: spec, TEXTS)
        exchange.redact_request(Call(transport="grpc", action="infer", scope="infer"), req, "echo-pii")
        resp = pb.ModelInferResponse(model_name="echo-pii", outputs=[pb.ModelInferResponse.InferOutputTensor(
            name="y", datatype="BYTES", shape=[1, 1])], raw_output_contents=list(req.raw_input_contents))
        exchange.render(resp)
    return (time.process_time() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp) / "models")
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo),
             "--data-dir", str(Path(tmp) / "data"), "--http-port", "0", "--grpc-port", str(port),
             "--log-level", "warning"], env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                grpc.channel_ready_future(ch).result(timeout=120)
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                deadline = time.time() + 120
                while True:
                    try:
                        latency(stub, "echo-pii", 1)
                        latency(stub, "echo-plain", 1)
                        break
                    except grpc.RpcError:
                        if time.time() > deadline:
                            raise
                        time.sleep(0.2)
                results: dict[str, list[float]] = {"echo-plain": [], "echo-pii": []}
                for model in results:
                    latency(stub, model, 300)  # warm-up
                for _ in range(args.rounds):
                    for model in results:
                        results[model] += latency(stub, model, args.requests // args.rounds)
        finally:
            proc.terminate()
            proc.wait(30)
    p = {m: (float(np.percentile(t, 50)) * 1000, float(np.percentile(t, 99)) * 1000) for m, t in results.items()}
    for m, (p50, p99) in p.items():
        print(f"{m:11s} p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    print(f"PII + policy adds {(p['echo-pii'][0] - p['echo-plain'][0]) * 1000:.0f} us p50 "
          f"({p['echo-pii'][0] / p['echo-plain'][0]:.3f}x)")
    print(f"in process: redact + restore {micro(5000):.1f} us CPU per request")


if __name__ == "__main__":
    main()
