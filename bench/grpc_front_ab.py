"""The gRPC front A/B: the MLP's ModelInfer over h2load against two servers started in the same
run, one with inhouse's own HTTP/2 front on the gRPC port (``grpc.front: fast``) and one with
grpc.aio serving it (``grpc.front: grpcio``), points interleaved round by round.

    python bench/grpc_front_ab.py --rounds 3 --duration 5
    python bench/grpc_front_ab.py --model mlp --concurrency 64,1

Each point reports req/s, p50 and the server's CPU per request (median of the rounds), and the
fast ÷ grpcio ratios of each; results also go to ``bench/results/grpc-front-<time>.json``."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  # bench/run.py: the model, the payload, the server and the load generator
from models import mlp_inputs, write_mlp  # noqa: E402

FRONTS = ("fast", "grpcio")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", default="64,1")
    p.add_argument("--model", default="mlp-batch", choices=["mlp-batch", "mlp"])
    p.add_argument("--transport", default="grpc-h2load", choices=["grpc-h2load", "grpc"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(f, c): [] for f in FRONTS for c in levels}
    with tempfile.TemporaryDirectory(prefix="inhouse-grpc-ab-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        repo = work / "mlp" / "models"
        repo.mkdir(parents=True)
        write_mlp(repo)
        payload = run.payload_file(mlp_inputs(1), work, "mlp")
        servers = {f: stack.enter_context(run.serve(repo, {"INHOUSE_GRPC__FRONT": f})) for f in FRONTS}
        for rnd in range(args.rounds):
            for c in levels:
                for front in FRONTS if rnd % 2 == 0 else FRONTS[::-1]:
                    r = run.load(servers[front], args.model, payload, args.transport, c, args.duration, args.warmup)
                    runs[(front, c)].append(r)
                    print(f"  round {rnd + 1}: {front:6} c={c:<3} rps={r.get('rps')} p50={r.get('p50_ms')}ms "
                          f"server_cpu/req={r.get('server_cpu_us_per_req')}us errors={r.get('errors', r.get('error'))}",
                          flush=True)
    summary: dict[str, Any] = {}
    for c in levels:
        med = {}
        for front in FRONTS:
            ok = [r for r in runs[(front, c)] if r.get("rps")]
            med[front] = {k: round(statistics.median(r[k] for r in ok), 3) if ok and all(r.get(k) for r in ok)
                          else None for k in ("rps", "p50_ms", "server_cpu_us_per_req")}
        f, g = med["fast"], med["grpcio"]
        summary[f"c{c}"] = {**med, "rps_ratio": round(f["rps"] / g["rps"], 2) if f["rps"] and g["rps"] else None,
                            "cpu_ratio": round(f["server_cpu_us_per_req"] / g["server_cpu_us_per_req"], 2)
                            if f["server_cpu_us_per_req"] and g["server_cpu_us_per_req"] else None}
        print(f"c={c}: {json.dumps(summary[f'c{c}'])}", flush=True)
    out = args.out or HERE / "results" / f"grpc-front-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"out": None}, "runs": {f"{f}-c{c}": r for (f, c), r in
                                                                          runs.items()}, "summary": summary},
                              indent=2, default=str))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
