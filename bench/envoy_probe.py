"""How far the gRPC port is from a native HTTP/2 stack: the MLP's ``ModelInfer`` over h2load (one
connection, as one gRPC channel) against, in the same run, inhouse as shipped (defaults, our own
HTTP/2 front in Python) and pyvoy (Envoy's HTTP/2 in C++ on its own threads, an embedded Python
interpreter running ``floor_envoy.py``), the latter with a fixed answer and with one onnxruntime
call per request. Points interleaved round by round; medians.

    pip install pyvoy    # into any environment with numpy, onnxruntime and protobuf
    python bench/envoy_probe.py --pyvoy /path/to/bin/pyvoy [--rounds 2] [--duration 5]

pyvoy's Python comes from the environment of the ``pyvoy`` executable: it needs numpy, onnxruntime
and protobuf there (inhouse's ``src`` is put on its path for the generated protobuf module)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  # bench/run.py: the model, the payload, the server and the load generator
from models import mlp_inputs, write_mlp  # noqa: E402

TRANSPORT = "grpc-h2load"


def _envoy_pid(pyvoy_pid: int) -> int:
    """pyvoy starts envoy as its child; the CPU to count is envoy's (it runs the Python app too)."""
    children = Path(f"/proc/{pyvoy_pid}/task/{pyvoy_pid}/children")
    for _ in range(100):
        kids = children.read_text().split() if children.exists() else []
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    return pyvoy_pid


@contextmanager
def pyvoy(binary: Path, model: Path | None, log: Path) -> Iterator[dict[str, str]]:
    import grpc

    port = run.free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")])}
    if model is not None:
        env["FLOOR_ENVOY_MODEL"] = str(model)
    with log.open("wb") as out:
        proc = subprocess.Popen([str(binary), "--port", str(port), "--log-level", "error", "--loop", "uvloop",
                                 "floor_envoy:app"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        call = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None)
        for _ in range(150):
            if proc.poll() is not None:
                sys.exit(f"pyvoy exited with {proc.returncode}; see {log}")
            try:
                call(b"", timeout=1)
                break
            except grpc.RpcError as err:  # an answer, even an error (the model wants inputs), means it serves
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    break
                time.sleep(0.2)
        yield {TRANSPORT: f"127.0.0.1:{port}", "pid": str(_envoy_pid(proc.pid))}
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pyvoy", type=Path, required=True, help="the pyvoy executable")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", default="64,1")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    names = ("inhouse", "pyvoy-fixed", "pyvoy-onnx")
    runs: dict[str, list[dict[str, Any]]] = {f"{n}-c{c}": [] for n in names for c in levels}
    with tempfile.TemporaryDirectory(prefix="inhouse-envoy-probe-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        repo = work / "models"
        repo.mkdir()
        (work / "mlp.onnx").write_bytes(write_mlp(repo, ("mlp-batch",)))
        payload = run.payload_file(mlp_inputs(1), work, "mlp")
        servers = {"inhouse": stack.enter_context(run.serve(repo)),
                   "pyvoy-fixed": stack.enter_context(pyvoy(args.pyvoy, None, work / "pyvoy-fixed.log")),
                   "pyvoy-onnx": stack.enter_context(pyvoy(args.pyvoy, work / "mlp.onnx", work / "pyvoy-onnx.log"))}
        for rnd in range(args.rounds):
            for c in levels:
                for name in names if rnd % 2 == 0 else names[::-1]:
                    r = run.load(servers[name], "mlp-batch", payload, TRANSPORT, c, args.duration, args.warmup)
                    runs[f"{name}-c{c}"].append(r)
                    print(f"  round {rnd + 1}: {name:11} c={c:<3} rps={r.get('rps')} p50={r.get('p50_ms')}ms "
                          f"server_cpu/req={r.get('server_cpu_us_per_req')}us errors={r.get('errors', r.get('error'))}",
                          flush=True)
    summary: dict[str, Any] = {}
    for key, rs in runs.items():
        ok = [r for r in rs if r.get("rps")]
        summary[key] = {k: round(statistics.median(r[k] for r in ok), 3) if ok and all(r.get(k) for r in ok)
                        else None for k in ("rps", "p50_ms", "server_cpu_us_per_req")}
        print(f"{key}: {json.dumps(summary[key])}", flush=True)
    out = args.out or HERE / "results" / f"envoy-probe-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"out": None, "pyvoy": str(args.pyvoy)}, "runs": runs,
                               "summary": summary}, indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
