"""REST throughput with ``workers: 1`` against ``workers: N``, the server as shipped (default
settings: access log on) over the MLP of ``bench/run.py`` (max batch 64, 1 ms queue delay, one
onnxruntime thread), A/B interleaved in one run with ``bench/loadgen.py``:

    python bench/bench_workers.py --workers 2 -c 64 -d 10 --rounds 2
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

from models import mlp_inputs, mlp_model, write  # noqa: E402
from run import payload_file  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(repo: Path, data: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--data-dir", str(data),
         "--http-port", str(port), "--grpc-port", str(_free_port()), "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the access log is written, and thrown away
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = work / "models"
        repo.mkdir()
        write(repo, "mlp-batch", mlp_model(), {
            "onnxruntime": {"intra_op_threads": 1, "spinning": False}, "warmup": {"samples": 8},
            "batching": {"max_batch_size": 64, "preferred_batch_sizes": [16, 32, 64], "max_queue_delay_ms": 1,
                         "max_queue_size": 2048, "default_timeout_ms": 2000, "priority_levels": 2}})
        payload = payload_file(mlp_inputs(1), work, "mlp")
        rows = []
        for r in range(args.rounds):
            for n in (1, args.workers):
                proc, url = serve(repo, work / f"data-{n}", n)
                try:
                    result = load(url, payload, args.concurrency, args.duration)
                finally:
                    proc.terminate()
                    proc.wait(60)
                row = {"round": r, "workers": n, "rps": result["rps"], "p50_ms": result["p50_ms"],
                       "p99_ms": result["p99_ms"], "errors": result["errors"], "loadavg_1m": os.getloadavg()[0]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for n in (1, args.workers):
            mine = [float(str(x["rps"])) for x in rows if x["workers"] == n]
            print(f"workers={n}: req/s {mine}", flush=True)
        one = sum(float(str(x["rps"])) for x in rows if x["workers"] == 1)
        many = sum(float(str(x["rps"])) for x in rows if x["workers"] == args.workers)
        print(f"ratio workers={args.workers} / workers=1: {many / one:.2f} (cores: {os.cpu_count()})", flush=True)


if __name__ == "__main__":
    main()
