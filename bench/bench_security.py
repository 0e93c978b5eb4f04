"""Overhead of the security layer (API-key auth, per-key rate limit, IP allow-list, content
policy and the audit log, all on) on an overhead-bound model, against the same server with
security off, measured in the same run.

    python bench/bench_security.py [--requests 2000] [--seconds 5] [--concurrency 8] [--rounds 2]

Prints p50 / p99 latency at concurrency 1 and throughput at --concurrency for both, and the
differences. Servers run as subprocesses (``inhouse serve``) so the client does not share
their event loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from onnx import TensorProto, helper

BODY = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]},
                   {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


def make_repo(root: Path, policy: bool) -> Path:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["out"])], "add", [a, b], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    vdir = root / "add" / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.onnx").write_bytes(model.SerializeToString())
    spec: dict[str, object] = {"name": "add", "backend": "onnxruntime"}
    if policy:
        spec["policy"] = {"max_input_bytes": 65536, "deny_patterns": ["(?i)ignore previous instructions"]}
    (root / "add" / "model.yaml").write_text(yaml.safe_dump(spec))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(repo: Path, data: Path, secured: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo),
            "--data-dir", str(data), "--http-port", str(port), "--grpc-port", "0", "--log-level", "warning"]
    env = dict(os.environ)
    if secured:
        args.append("--auth")
        env["INHOUSE_ALLOW_IPS"] = '["127.0.0.0/8"]'
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, headers: dict[str, str]) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.post(url + "/v2/models/add/infer", json=BODY, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def latency(url: str, headers: dict[str, str], n: int) -> tuple[float, float]:
    times = []
    with httpx.Client(base_url=url, headers=headers) as c:
        for _ in range(200):
            c.post("/v2/models/add/infer", json=BODY)
        for _ in range(n):
            t = time.perf_counter()
            r = c.post("/v2/models/add/infer", json=BODY)
            times.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise RuntimeError(r.text)
    arr = np.array(times) * 1000
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


async def throughput(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                r = await c.post("/v2/models/add/infer", json=BODY)
                if r.status_code != 200:
                    raise RuntimeError(r.text)
                done += 1

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t)


def micro(n: int, tmp: Path) -> None:
    """CPU time (process time, all threads: not inflated by other processes on a busy machine) the security
    middleware adds per request, around a trivial ASGI app, with and without security on."""
    import orjson

    from inhouse.core.dataplane import DataPlane
    from inhouse.core.manager import ModelManager
    from inhouse.core.repository import ModelRepository
    from inhouse.protocols.infer_entry import InferEntry
    from inhouse.protocols.security_http import SecurityMiddleware
    from inhouse.security.gate import SecurityGate
    from inhouse.security.keys import KeyStore
    from inhouse.settings import load_settings

    body = orjson.dumps(BODY)

    async def inner(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict:  # type: ignore[type-arg]
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        pass

    async def drive(app: object, headers: list[tuple[bytes, bytes]], workers: int = 1) -> tuple[float, float]:
        """(CPU us, wall us) per request, with ``workers`` concurrent callers."""
        scope = {"type": "http", "method": "POST", "path": "/v2/models/add/infer", "headers": headers,
                 "client": ("127.0.0.1", 5000), "query_string": b""}

        async def worker(k: int) -> None:
            for _ in range(k):
                await app(scope, receive, send)  # type: ignore[operator]

        await worker(200)
        t, w = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n // workers) for _ in range(workers)))
        return (time.process_time() - t) / n * 1e6, (time.perf_counter() - w) / n * 1e6

    repo = make_repo(tmp / "micro-repo", policy=True)
    manager = ModelManager(ModelRepository(repo))
    data = tmp / "micro-data"
    store = KeyStore(data)
    key = store.create("bench", ["infer"], models=["add"], rate="1000000/s")[0]
    store.close()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def run_all() -> None:
        await manager.load("add")
        off_gate = SecurityGate(load_settings(None, data_dir=tmp / "micro-off"), manager)
        off = SecurityMiddleware(inner, off_gate, 1 << 26)
        on_gate = SecurityGate(load_settings(None, data_dir=data, auth=True, allow_ips=["127.0.0.0/8"]), manager)
        on = SecurityMiddleware(inner, on_gate, 1 << 26)
        auth = [*base, (b"authorization", f"Bearer {key}".encode())]
        # the v2 infer hot path (protocols/infer_entry.py) with the model call, same gates
        dataplane = DataPlane(manager)
        hot_off = InferEntry(inner, dataplane=dataplane, gate=off_gate, max_request_bytes=1 << 26)
        hot_on = InferEntry(inner, dataplane=dataplane, gate=on_gate, max_request_bytes=1 << 26)
        for workers in (1, 8):
            h_off = await drive(hot_off, base, workers)
            h_on = await drive(hot_on, auth, workers)
            print(f"v2 infer hot path per request (model call included), {workers} concurrent caller(s), {n} "
                  f"requests: CPU (all threads) / wall time: security off {h_off[0]:.1f} / {h_off[1]:.1f} us; "
                  f"security on (auth + rate limit + allow-list + policy + audit) +{h_on[0] - h_off[0]:.1f} / "
                  f"+{h_on[1] - h_off[1]:.1f} us", flush=True)
        for workers in (1, 8):
            bare = await drive(inner, base, workers)
            t_off = await drive(off, base, workers)
            t_on = await drive(on, auth, workers)
            print(f"middleware per request, {workers} concurrent caller(s), {n} requests: CPU (all threads) / wall "
                  f"time: bare app {bare[0]:.1f} / {bare[1]:.1f} us; security off +{t_off[0] - bare[0]:.1f} / "
                  f"+{t_off[1] - bare[1]:.1f} us; security on (auth + rate limit + allow-list + policy + audit) "
                  f"+{t_on[0] - bare[0]:.1f} / +{t_on[1] - bare[1]:.1f} us", flush=True)
        await manager.close()

    asyncio.run(run_all())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--micro-only", action="store_true", help="only the in-process middleware measurement")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inhouse-bench-sec-"))
    micro(args.requests, tmp)
    if args.micro_only:
        return
    from inhouse.security.keys import KeyStore

    plain_repo = make_repo(tmp / "plain", policy=False)
    secure_repo = make_repo(tmp / "secure", policy=True)
    store = KeyStore(tmp / "data-secure")
    key = store.create("bench", ["infer"], models=["add"], rate="1000000/s")[0]
    store.close()
    results: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            secured = mode == "on"
            proc, url = start(secure_repo if secured else plain_repo, tmp / f"data-{'secure' if secured else 'plain'}",
                              secured)
            headers = {"authorization": f"Bearer {key}"} if secured else {}
            try:
                wait_ready(url, headers)
                p50, p99 = latency(url, headers, args.requests)
                rps = asyncio.run(throughput(url, headers, args.seconds, args.concurrency))
            finally:
                proc.terminate()
                proc.wait(30)
            results[mode].append((p50, p99, rps))
            print(f"security {mode:>3}: p50 {p50:.3f} ms  p99 {p99:.3f} ms  {rps:,.0f} req/s "
                  f"(concurrency {args.concurrency})", flush=True)
    off = [statistics.median(x) for x in zip(*results["off"], strict=True)]
    on = [statistics.median(x) for x in zip(*results["on"], strict=True)]
    print(f"\nmedian of {args.rounds} rounds")
    print(f"  p50 latency  off {off[0]:.3f} ms   on {on[0]:.3f} ms   added {on[0] - off[0]:+.3f} ms")
    print(f"  p99 latency  off {off[1]:.3f} ms   on {on[1]:.3f} ms")
    print(f"  throughput   off {off[2]:,.0f}/s   on {on[2]:,.0f}/s   ratio {on[2] / off[2]:.3f}")
    log_rows = sum(1 for _ in __import__("sqlite3").connect(tmp / "data-secure" / "audit.sqlite3").execute(
        "SELECT seq FROM audit"))
    print(f"  audit entries written by the secured runs: {log_rows}")


if __name__ == "__main__":
    main()
