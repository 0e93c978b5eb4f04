"""The tabular MLP through Ray Serve (2 replicas, a local Ray started by the server) against one
plain inhouse process, same run, default settings otherwise, A/B interleaved with
``bench/loadgen.py`` over v2 REST:

    python bench/bench_ray.py -d 10 --rounds 2          # needs inhouse[ray]

Reports req/s at concurrency 64 (Ray ÷ plain) and the p50 Ray adds at concurrency 1."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_workers import _free_port, load  # noqa: E402
from models import mlp_inputs, mlp_model, write  # noqa: E402
from run import payload_file  # noqa: E402


def serve(repo: Path, data: Path, ray: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--data-dir", str(data),
           "--http-port", str(port), "--grpc-port", str(_free_port())]
    if ray:
        cmd += ["--ray", "local"]
    log = open(data.parent / f"{data.name}.log", "wb")  # noqa: SIM115 - the server writes it while it runs
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v2/models/mlp-batch/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server (ray={ray}) exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server (ray={ray}) did not become ready")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args()
    batching = {"max_batch_size": 64, "preferred_batch_sizes": [16, 32, 64], "max_queue_delay_ms": 1,
                "max_queue_size": 2048, "default_timeout_ms": 2000}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plain, onray = work / "plain", work / "ray"
        for repo, extra in ((plain, {}), (onray, {"ray": {"replicas": args.replicas, "num_cpus": 0.5}})):
            repo.mkdir()
            write(repo, "mlp-batch", mlp_model(), {"onnxruntime": {"intra_op_threads": 1}, "warmup": {"samples": 8},
                                                   "batching": batching, **extra})
        payload = payload_file(mlp_inputs(1), work, "mlp")
        rows = []
        for r in range(args.rounds):
            for kind, repo in (("plain", plain), ("ray", onray)):
                proc, url = serve(repo, work / f"data-{kind}-{r}", kind == "ray")
                try:
                    for c in (1, 64):
                        res = load(url, payload, c, args.duration)
                        row = {"round": r, "server": kind, "concurrency": c, "rps": res["rps"],
                               "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "errors": res["errors"],
                               "loadavg_1m": round(os.getloadavg()[0], 1)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    os.killpg(proc.pid, 15)
                    proc.wait(120)
        shutil.rmtree(work / "ray-tmp", ignore_errors=True)

        def med(kind: str, c: int, key: str) -> float:
            xs = sorted(float(str(x[key])) for x in rows if x["server"] == kind and x["concurrency"] == c)
            return xs[len(xs) // 2]

        print(f"c=64 req/s: ray {med('ray', 64, 'rps'):.0f} / plain {med('plain', 64, 'rps'):.0f} = "
              f"{med('ray', 64, 'rps') / med('plain', 64, 'rps'):.2f}", flush=True)
        print(f"c=1 p50: ray {med('ray', 1, 'p50_ms'):.2f} ms, plain {med('plain', 1, 'p50_ms'):.2f} ms, "
              f"added {med('ray', 1, 'p50_ms') - med('plain', 1, 'p50_ms'):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
