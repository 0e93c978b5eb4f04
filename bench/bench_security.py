"""Overhead of the security layer (API-key auth, per-key rate limit, IP allow-list, content
policy and the audit log, all on) on an overhead-bound model, against the same server with
security off, measured in the same run.

    python bench/bench_security.py [--requests 3000] [--duration 4] [--concurrency 64,1] [--rounds 2]
                                   [--transport rest|grpc]

1. In process (``--micro-only`` stops here): CPU time per request of the v2 infer hot path
   and of the HTTP middleware, security off and on, with 1 and 8 concurrent callers; then the
   event-loop thread CPU per request of the v2 infer entry with 64 callers on uvloop and the
   audit writer process running, as in a busy server (steadier than end to end).
2. End to end: the 32-feature MLP of ``bench/models.py`` served by ``inhouse serve`` twice
   (security off; security on), each a subprocess, loaded by ``bench/loadgen.py`` (raw
   asyncio, its own process, a few microseconds per request, so the server is the
   bottleneck) at each ``--concurrency``; ``--transport grpc`` sends v2 gRPC instead, the API
   key as call metadata. Both servers run throughout; each round measures off
   and on back to back, alternating which goes first. Prints, per
   concurrency, the medians of requests/s, p50 / p99 and the server's CPU per request, the
   throughput ratio on ÷ off and the p50 difference."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

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


def start(repo: Path, data: Path, secured: bool, grpc_port: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo),
            "--data-dir", str(data), "--http-port", str(port), "--grpc-port", str(grpc_port), "--log-level", "warning"]
    env = dict(os.environ)
    if secured:
        args.append("--auth")
        env["INHOUSE_ALLOW_IPS"] = '["127.0.0.0/8"]'
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen[bytes], headers: dict[str, str]) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(url + "/v2/models/mlp/ready", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def mlp_repo(root: Path, policy: bool) -> Path:
    """The MLP of bench/models.py, batching off, one intra-op thread (as bench/run.py serves it)."""
    from models import MLP_SPEC, mlp_model, write

    spec: dict[str, Any] = dict(MLP_SPEC)
    if policy:
        spec["policy"] = {"max_input_bytes": 65536, "deny_patterns": ["(?i)ignore previous instructions"]}
    write(root, "mlp", mlp_model(), spec)
    return root


def mlp_payload(path: Path) -> Path:
    """One row of 32 features as v2 JSON (the content policy's text rules need JSON tensor data)."""
    from models import mlp_inputs

    feed = mlp_inputs(1)
    inputs = [{"name": k, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
              for k, v in feed.items()]
    path.write_text(json.dumps({"header": {"inputs": inputs}, "binary_hex": ""}))
    return path


def bench_key(data: Path, model: str) -> str:
    """An infer key for ``model`` in the key store under ``data`` (a rate limit too high to bind)."""
    from inhouse.security.keys import KeyStore

    store = KeyStore(data)
    key = store.create("bench", ["infer"], models=[model], rate="1000000/s")[0]
    store.close()
    return key


def gates(manager: Any, off_data: Path, on_data: Path) -> tuple[Any, Any]:
    """Two security gates over one model manager: everything off, and keys + allow-list + audit."""
    from inhouse.security.gate import SecurityGate
    from inhouse.settings import load_settings

    return (SecurityGate(load_settings(None, data_dir=off_data), manager),
            SecurityGate(load_settings(None, data_dir=on_data, auth=True, allow_ips=["127.0.0.0/8"]), manager))


def loadgen(url: str, pid: int, payload: Path, concurrency: int, duration: float, warmup: float,
            headers: list[str], transport: str = "rest") -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "loadgen.py"), "--url", url, "--model", "mlp", "--payload", str(payload),
           "--transport", transport, "-c", str(concurrency), "-d", str(duration), "--warmup", str(warmup),
           "--server-pid", str(pid)]
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-800:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} failed requests: {result['statuses']}")
    return result


def end_to_end(args: argparse.Namespace, tmp: Path) -> None:

    if args.transport == "grpc":  # raw tensor contents (the gRPC load generator sends those)
        from models import mlp_inputs
        from run import payload_file

        payload = payload_file(mlp_inputs(1), tmp, "mlp-raw")
    else:
        payload = mlp_payload(tmp / "mlp.json")
    repos = {"off": mlp_repo(tmp / "e2e-off" / "models", policy=False),
             "on": mlp_repo(tmp / "e2e-on" / "models", policy=True)}
    key = bench_key(tmp / "e2e-on" / "data", "mlp")
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {(m, c): [] for m in ("off", "on") for c in levels}
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    targets: dict[str, str] = {}  # where the load generator sends its requests
    headers = {"off": [], "on": [f"Authorization: Bearer {key}"]}
    try:
        for mode in ("off", "on"):  # both up for the whole run; the idle one sleeps
            grpc_port = free_port() if args.transport == "grpc" else 0
            servers[mode] = start(repos[mode], repos[mode].parent / "data", mode == "on", grpc_port)
            targets[mode] = f"127.0.0.1:{grpc_port}" if grpc_port else servers[mode][1]
            wait_ready(servers[mode][1], servers[mode][0], {"authorization": f"Bearer {key}"} if mode == "on" else {})
        for rnd in range(args.rounds):
            for c in levels:
                # off and on back to back, alternating which goes first, so a neighbour's load
                # drifting over the run falls on both alike
                for mode in ("off", "on") if rnd % 2 == 0 else ("on", "off"):
                    proc = servers[mode][0]
                    r = loadgen(targets[mode], proc.pid, payload, c, args.duration, args.warmup, headers[mode],
                                args.transport)
                    results[(mode, c)].append(r)
                    print(f"  round {rnd + 1} c={c:<3} security {mode:>3} {r['rps']:>8,.0f} req/s  p50 "
                          f"{r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  server CPU "
                          f"{r['server_cpu_us_per_req']} us/req (event loop {r['server_loop_cpu_us_per_req']})",
                          flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    def med(mode: str, c: int, field: str) -> float:
        return float(statistics.median(r[field] for r in results[(mode, c)]))

    over = "gRPC" if args.transport == "grpc" else "REST"
    print(f"\nend to end, MLP over {over} (bench/loadgen.py), median of {args.rounds} rounds, security off -> on:")
    for c in levels:
        off_rps, on_rps = med("off", c, "rps"), med("on", c, "rps")
        rounds = list(zip(results[("on", c)], results[("off", c)], strict=True))
        pairs = statistics.median(on["rps"] / off["rps"] for on, off in rounds)
        p50_pairs = statistics.median(on["p50_ms"] - off["p50_ms"] for on, off in rounds)
        print(f"  c={c:<3} throughput {off_rps:,.0f} -> {on_rps:,.0f} req/s, ratio {on_rps / off_rps:.3f} (median of "
              f"the rounds' ratios {pairs:.3f}); "
              f"p50 {med('off', c, 'p50_ms'):.3f} -> {med('on', c, 'p50_ms'):.3f} ms "
              f"({(med('on', c, 'p50_ms') - med('off', c, 'p50_ms')) * 1000:+.0f} us; median of the rounds' "
              f"differences {p50_pairs * 1000:+.0f} us); p99 "
              f"{med('off', c, 'p99_ms'):.3f} -> {med('on', c, 'p99_ms'):.3f} ms; server CPU "
              f"{med('off', c, 'server_cpu_us_per_req'):.0f} -> {med('on', c, 'server_cpu_us_per_req'):.0f} us/req "
              f"({med('on', c, 'server_cpu_us_per_req') - med('off', c, 'server_cpu_us_per_req'):+.0f}); event-loop "
              f"thread CPU {med('off', c, 'server_loop_cpu_us_per_req'):.0f} -> "
              f"{med('on', c, 'server_loop_cpu_us_per_req'):.0f} us/req: its capacity ratio (what the loop alone "
              f"could serve, on / off) "
              f"{med('off', c, 'server_loop_cpu_us_per_req') / med('on', c, 'server_loop_cpu_us_per_req'):.3f}")
    db = sqlite3.connect(repos["on"].parent / "data" / "audit.sqlite3")
    print(f"  audit entries written by the secured runs: {db.execute('SELECT count(*) FROM audit').fetchone()[0]}")
    db.close()


def micro(n: int, tmp: Path, rounds: int = 3) -> None:
    """CPU time (process time, all threads: not inflated by other processes on a busy machine) the security
    middleware adds per request, around a trivial ASGI app, with and without security on."""
    import orjson

    from inhouse.core.dataplane import DataPlane
    from inhouse.core.manager import ModelManager
    from inhouse.core.repository import ModelRepository
    from inhouse.transports.http.infer_entry import InferEntry
    from inhouse.transports.http.security import SecurityMiddleware

    body = orjson.dumps(BODY)

    async def inner(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    never: asyncio.Future[None] | None = None

    def receiver() -> object:
        """A request's ``receive``: its body once, then nothing until the connection closes (as a
        server's blocks), so a slow request's disconnect watch waits instead of spinning."""
        sent = False

        async def receive() -> dict:  # type: ignore[type-arg]
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            assert never is not None
            await never
            return {"type": "http.disconnect"}

        return receive

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        pass

    async def drive(app: object, headers: list[tuple[bytes, bytes]], workers: int = 1) -> tuple[float, float]:
        """(CPU us, wall us) per request, with ``workers`` concurrent callers."""
        scope = {"type": "http", "method": "POST", "path": "/v2/models/add/infer", "headers": headers,
                 "client": ("127.0.0.1", 5000), "query_string": b""}

        async def worker(k: int) -> None:
            for _ in range(k):
                await app(scope, receiver(), send)  # type: ignore[operator]

        await worker(200)
        t, w = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n // workers) for _ in range(workers)))
        return (time.process_time() - t) / n * 1e6, (time.perf_counter() - w) / n * 1e6

    repo = make_repo(tmp / "micro-repo", policy=True)
    manager = ModelManager(ModelRepository(repo))
    data = tmp / "micro-data"
    key = bench_key(data, "add")
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def run_all() -> None:
        nonlocal never
        never = asyncio.get_running_loop().create_future()
        await manager.load("add")
        off_gate, on_gate = gates(manager, tmp / "micro-off", data)
        off = SecurityMiddleware(inner, off_gate, 1 << 26)
        on = SecurityMiddleware(inner, on_gate, 1 << 26)
        auth = [*base, (b"authorization", f"Bearer {key}".encode())]
        # the v2 infer hot path (transports/http/infer_entry.py) with the model call, same gates
        dataplane = DataPlane(manager)
        hot_off = InferEntry(inner, dataplane=dataplane, gate=off_gate, max_request_bytes=1 << 26)
        hot_on = InferEntry(inner, dataplane=dataplane, gate=on_gate, max_request_bytes=1 << 26)
        commits = on_gate.commits
        assert commits is not None

        def med(values: list[tuple[float, float]], i: int) -> float:
            return statistics.median(v[i] for v in values)

        async def interleaved(runs: list[tuple[object, list[tuple[bytes, bytes]]]],
                              workers: int) -> list[list[tuple[float, float]]]:
            """Each (app, headers) driven once per round, in turn: drifting load on a shared
            machine hits them all alike."""
            results: list[list[tuple[float, float]]] = [[] for _ in runs]
            for _ in range(rounds):
                for out, (app, headers) in zip(results, runs, strict=True):
                    out.append(await drive(app, headers, workers))
            return results

        for workers in (1, 8):
            commits.commits = commits.entries = 0
            offs, ons = await interleaved([(hot_off, base), (hot_on, auth)], workers)
            print(f"v2 infer hot path per request (model call included), {workers} concurrent caller(s), {n} "
                  f"requests, median of {rounds}: CPU (all threads) / wall time: security off {med(offs, 0):.1f} / "
                  f"{med(offs, 1):.1f} us; security on (auth + rate limit + allow-list + policy + audit) "
                  f"+{med(ons, 0) - med(offs, 0):.1f} / +{med(ons, 1) - med(offs, 1):.1f} us (audit: "
                  f"{commits.entries / max(commits.commits, 1):.1f} entries per commit)", flush=True)
        for workers in (1, 8):
            bares, offs, ons = await interleaved([(inner, base), (off, base), (on, auth)], workers)
            print(f"middleware per request, {workers} concurrent caller(s), {n} requests, median of {rounds}: CPU "
                  f"(all threads) / wall time: bare app {med(bares, 0):.1f} / {med(bares, 1):.1f} us; security off "
                  f"+{med(offs, 0) - med(bares, 0):.1f} / +{med(offs, 1) - med(bares, 1):.1f} us; security on "
                  f"(auth + rate limit + allow-list + policy + audit) +{med(ons, 0) - med(bares, 0):.1f} / "
                  f"+{med(ons, 1) - med(bares, 1):.1f} us", flush=True)
        await manager.close()

    asyncio.run(run_all())


def loop_micro(n: int, tmp: Path, rounds: int = 5, callers: int = 64) -> None:
    """Event-loop thread CPU per request of the v2 infer entry, security off and on, the way a
    busy server runs it: uvloop, ``callers`` concurrent callers, the audit writer process
    started (so audit entries go to it in batches). Steadier than end to end on a shared machine."""
    import orjson
    import uvloop

    from inhouse.core.dataplane import DataPlane
    from inhouse.core.manager import ModelManager
    from inhouse.core.repository import ModelRepository
    from inhouse.transports.http.infer_entry import InferEntry

    body = orjson.dumps(BODY)
    repo = make_repo(tmp / "loop-repo", policy=True)
    data = tmp / "loop-data"
    key = bench_key(data, "add")

    async def read_body() -> bytes:
        return body

    async def guard(work: Any) -> Any:
        return await work

    async def run_all() -> None:
        manager = ModelManager(ModelRepository(repo))
        await manager.load("add")
        off_gate, on_gate = gates(manager, tmp / "loop-off", data)
        await on_gate.start()
        dataplane = DataPlane(manager)
        entries = {"off": InferEntry(None, dataplane=dataplane, gate=off_gate, max_request_bytes=1 << 26),  # type: ignore[arg-type]
                   "on": InferEntry(None, dataplane=dataplane, gate=on_gate, max_request_bytes=1 << 26)}  # type: ignore[arg-type]
        base = {b"content-type": b"application/json", b"content-length": str(len(body)).encode()}
        headers = {"off": base, "on": {**base, b"authorization": f"Bearer {key}".encode()}}

        async def drive(which: str, count: int) -> float:
            entry, h = entries[which], headers[which]

            async def caller(k: int) -> None:
                for _ in range(k):
                    reply = await entry.answer("/v2/models/add/infer", "add", None, h, "127.0.0.1", read_body, guard,
                                               time.perf_counter())
                    assert reply.status == 200, reply

            await asyncio.gather(*(caller(50) for _ in range(callers)))  # warm
            t = time.thread_time()
            await asyncio.gather(*(caller(count // callers) for _ in range(callers)))
            return (time.thread_time() - t) / count * 1e6

        results: dict[str, list[float]] = {"off": [], "on": []}
        for r in range(rounds):
            for which in (("off", "on") if r % 2 == 0 else ("on", "off")):
                results[which].append(await drive(which, n))
        off, on = statistics.median(results["off"]), statistics.median(results["on"])
        commits = on_gate.commits
        assert commits is not None
        print(f"v2 infer entry, {callers} callers on uvloop, audit writer running, median of {rounds}: event-loop "
              f"thread CPU per request: security off {off:.1f} us, on {on:.1f} us (+{on - off:.1f} us; "
              f"{commits.entries / max(commits.commits, 1):.1f} audit entries per batch)", flush=True)
        await on_gate.aclose()
        off_gate.close()
        await manager.close()

    uvloop.run(run_all())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="in process: requests per measurement")
    p.add_argument("--duration", type=float, default=4.0, help="end to end: seconds measured per point")
    p.add_argument("--warmup", type=float, default=1.0, help="end to end: seconds of load before measuring")
    p.add_argument("--concurrency", default="64,1", help="end to end: comma-separated connection counts")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--transport", choices=("rest", "grpc"), default="rest",
                   help="end to end: v2 REST, or v2 gRPC (the API key as call metadata)")
    p.add_argument("--micro-only", action="store_true", help="only the in-process measurement")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end measurement")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="inhouse-bench-sec-"))
    if not args.e2e_only:
        micro(args.requests, tmp, max(args.rounds, 3))
        loop_micro(max(args.requests, 20000), tmp, max(args.rounds, 5))
    if not args.micro_only:
        end_to_end(args, tmp)


if __name__ == "__main__":
    main()
