"""Response cache: p50 latency of a cache hit ÷ a miss, for the tabular MLP over v2 REST infer and
a tiny chat LLM at temperature 0 over /v1/chat/completions, measured in the same run.

    python bench/bench_cache.py [--requests 400] [--llm-requests 30] [--redis]

One ``inhouse serve`` subprocess per store (memory; with ``--redis`` also a redis-server started
here on a free port, from ``scripts/redis_server.sh``). Requests are sent one at a time (c=1) with
httpx, interleaved: a *miss* (a body never sent before: new features / a new user message, so it
is computed and then stored), a *hit* (one fixed body, cached), and *uncached* (the same fixed
body with ``Cache-Control: no-cache``: the model call without any cache work). Prints the p50 of
each and the ratios hit ÷ miss and hit ÷ uncached."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "tests"))  # the tiny test LLM (llm_fixtures), built on the fly

from models import mlp_model, write  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_repo(root: Path, with_llm: bool) -> Path:
    repo = root / "models"
    write(repo, "mlp", mlp_model(), {"response_cache": {"enabled": True}})
    if with_llm:
        from llm_fixtures import build_causal_lm

        source = build_causal_lm(root / "tiny-llama", "llama")
        (repo / "tiny-llama" / "1").mkdir(parents=True)
        (repo / "tiny-llama" / "model.yaml").write_text(yaml.safe_dump({
            "name": "tiny-llama", "backend": "transformers", "task": "chat", "source": str(source),
            "max_model_len": 512, "response_cache": {"enabled": True}}))
    return repo


def start_server(repo: Path, data: Path, extra: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = data / "inhouse.yaml"
    data.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"access_log": False, "log_level": "warning", **extra}))
    proc = subprocess.Popen([sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--data-dir", str(data),
                             "--config", str(config), "--http-port", str(port), "--grpc-port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 180
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def timed(c: httpx.Client, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = c.post(path, json=body, headers=headers)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
    return dt


def measure(c: httpx.Client, path: str, fresh: Any, fixed: dict[str, Any], n: int) -> dict[str, float]:
    timed(c, path, fixed)  # stores the fixed body's answer
    for _ in range(3):
        timed(c, path, fixed)  # warm
    miss, hit, uncached = [], [], []
    for i in range(n):
        order = [(miss, fresh(i), None), (hit, fixed, None), (uncached, fixed, {"cache-control": "no-cache"})]
        for bucket, body, headers in order[i % 3:] + order[:i % 3]:  # rotate who goes first
            bucket.append(timed(c, path, body, headers))
    p50 = {k: statistics.median(v) * 1e3 for k, v in (("miss", miss), ("hit", hit), ("uncached", uncached))}
    return {**{f"{k}_p50_ms": round(v, 3) for k, v in p50.items()},
            "hit_over_miss": round(p50["hit"] / p50["miss"], 3),
            "hit_over_uncached": round(p50["hit"] / p50["uncached"], 3)}


def mlp_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}


def chat_body(text: str) -> dict[str, Any]:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": 16}


def run_store(name: str, repo: Path, data: Path, extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    proc, url = start_server(repo, data, extra)
    rng = np.random.default_rng(0)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            out = {"store": name,
                   "mlp_v2_rest": measure(c, "/v2/models/mlp/infer",
                                          lambda i: mlp_body(rng.standard_normal(32).astype(np.float32)),
                                          mlp_body(np.full(32, 0.5, np.float32)), args.requests)}
            if args.llm_requests:
                out["llm_chat"] = measure(c, "/v1/chat/completions", lambda i: chat_body(f"hello world {i} times"),
                                          chat_body("hello world"), args.llm_requests)
            return out
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400, help="MLP requests of each kind")
    ap.add_argument("--llm-requests", type=int, default=30, help="chat requests of each kind (0: no LLM)")
    ap.add_argument("--redis", action="store_true", help="also the Redis store")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    redis_proc = None
    try:
        repo = make_repo(tmp, args.llm_requests > 0)
        results = [run_store("memory", repo, tmp / "data-mem", {}, args)]
        if args.redis:
            binary = os.environ.get("INHOUSE_REDIS_SERVER") or subprocess.run(
                ["bash", str(HERE.parent / "scripts" / "redis_server.sh")], capture_output=True, text=True,
                check=True).stdout.strip()
            port = free_port()
            redis_proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--dir", str(tmp)], stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            results.append(run_store("redis", repo, tmp / "data-redis",
                                     {"cache": {"redis_url": f"redis://127.0.0.1:{port}/0"}}, args))
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if redis_proc is not None:
            redis_proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
