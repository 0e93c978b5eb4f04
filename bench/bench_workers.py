"""REST throughput with ``workers: 1`` against ``workers: N`` (``default``: no flag, the server's
own default), the server as shipped (default settings: access log on) over the MLP of
``bench/run.py`` (max batch 64, 1 ms queue delay, one onnxruntime thread), A/B interleaved in
one run with ``bench/loadgen.py``:

    python bench/bench_workers.py --workers 2 -c 64 -d 10 --rounds 2

``--chat-hop N``: also a chat stream (tiny built-in-engine LLM, ``placement: one``) through the
worker that holds the model and through the other one (its stand-in routes every call to the
owner), N streams of 64 tokens each way, interleaved: the hop's cost per token.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import mlp_inputs, write_mlp  # noqa: E402
from run import payload_file  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(repo: Path, data: Path, workers: int | None) -> tuple[subprocess.Popen[bytes], str]:
    """``workers`` None: the server's default (one per core, up to 8)."""
    port = _free_port()
    flag = [] if workers is None else ["--workers", str(workers)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--data-dir", str(data),
         "--http-port", str(port), "--grpc-port", str(_free_port()), *flag],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the access log is written, and thrown away
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), 8)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        # every worker answers ready: fresh connections spread over them
        try:
            pids = set()
            for _ in range(16):
                with httpx.Client(base_url=url, timeout=2) as c:
                    if c.get("/v2/health/ready").status_code == 200:
                        pids.add(c.get("/v2").json().get("worker", {}).get("pid", proc.pid))
            if len(pids) >= workers:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server with {workers} workers did not become ready")


def load(url: str, payload: Path, concurrency: int, duration: float) -> dict[str, object]:
    out = subprocess.run([sys.executable, str(HERE / "loadgen.py"), "--url", url, "--model", "mlp-batch",
                          "--payload", str(payload), "-c", str(concurrency), "-d", str(duration)],
                         capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _stream(client: httpx.Client, tokens: int) -> tuple[float, int]:
    """Seconds from the request to the last token of one chat stream, and the chunks it came in."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    started, chunks = time.perf_counter(), 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
    return time.perf_counter() - started, chunks


def chat_hop(work: Path, streams: int, tokens: int = 64) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from llm_fixtures import build_causal_lm, write_llm_model

    repo = work / "llm"
    write_llm_model(repo, "chat", build_causal_lm(work / "hf", "llama"), {"max_model_len": 512})
    proc, url = serve(repo, work / "data-llm", 2)
    try:
        clients: dict[bool, httpx.Client] = {}  # by: does this connection reach the owner
        while len(clients) < 2:
            c = httpx.Client(base_url=url, timeout=120)
            owner = "(worker" not in c.get("/v2/models/chat").json()["platform"]
            if owner in clients:
                c.close()
            else:
                clients[owner] = c
        for c in clients.values():
            _stream(c, tokens)  # warm both paths
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(streams):
            for owner, c in clients.items():
                seconds, _ = _stream(c, tokens)
                times[owner].append(seconds)
        direct, hop = sorted(times[True])[streams // 2], sorted(times[False])[streams // 2]
        print(json.dumps({"chat_stream_tokens": tokens, "streams": streams, "direct_median_s": round(direct, 4),
                          "through_other_worker_median_s": round(hop, 4), "ratio": round(hop / direct, 3),
                          "per_token_overhead_ms": round((hop - direct) / tokens * 1000, 3),
                          "loadavg_1m": os.getloadavg()[0]}), flush=True)
        for c in clients.values():
            c.close()
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2", help="N, or 'default' (no --workers flag)")
    p.add_argument("--chat-hop", type=int, default=0, metavar="STREAMS")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    many: int | None = None if args.workers == "default" else int(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = work / "models"
        repo.mkdir()
        write_mlp(repo, ("mlp-batch",))
        payload = payload_file(mlp_inputs(1), work, "mlp")
        rows = []
        for r in range(args.rounds):
            for n in (1, many):
                proc, url = serve(repo, work / f"data-{n}", n)
                try:
                    result = load(url, payload, args.concurrency, args.duration)
                finally:
                    proc.terminate()
                    proc.wait(60)
                row = {"round": r, "workers": n or "default", "rps": result["rps"], "p50_ms": result["p50_ms"],
                       "p99_ms": result["p99_ms"], "errors": result["errors"], "loadavg_1m": os.getloadavg()[0]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        label = many or "default"
        for n in (1, label):
            mine = [float(str(x["rps"])) for x in rows if x["workers"] == n]
            print(f"workers={n}: req/s {mine}", flush=True)
        one = sum(float(str(x["rps"])) for x in rows if x["workers"] == 1)
        more = sum(float(str(x["rps"])) for x in rows if x["workers"] == label)
        print(f"ratio workers={args.workers} / workers=1: {more / one:.2f} (cores: {os.cpu_count()})", flush=True)
        if args.chat_hop:
            chat_hop(work, args.chat_hop)


if __name__ == "__main__":
    main()
