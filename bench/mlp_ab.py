"""Checkouts against each other (and Triton) on the MLP, one transport, one concurrency: each
checkout's ``src`` is served as a user starts it (``run.serve``, defaults), one server at a time,
rounds interleaved (the order reverses every round), medians printed.

    python bench/mlp_ab.py --src /tmp/before/src --src src [--triton /tmp/peerbench]
        [--transport grpc-h2load] [--concurrency 64] [--rounds 3] [--duration 5]

Every server starts fresh for each point, so none runs while another is measured."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  # bench/run.py: the server, Triton and the load generator
from models import mlp_inputs, write_mlp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", type=Path, required=True, help="a checkout's src folder (repeatable)")
    ap.add_argument("--triton", type=Path, default=None, metavar="PEERBENCH_DIR",
                    help="also Triton (python backend), from what the peer harness's setup installed")
    ap.add_argument("--peer-harness", type=Path, default=HERE.parent.parent / "shared" / "peerbench")
    ap.add_argument("--transport", default="grpc-h2load", choices=["rest", "grpc", "grpc-h2load"])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    args = ap.parse_args()
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="mlp-ab-") as tmp:
        work = Path(tmp)
        model = b""
        for i in range(len(args.src)):
            (work / f"s{i}" / "repo").mkdir(parents=True)
            model = write_mlp(work / f"s{i}" / "repo", ("mlp-batch",))
        payload = run.payload_file(mlp_inputs(1), work, "mlp")
        names = [str(s.resolve()) for s in args.src] + (["triton"] if args.triton else [])
        for r in range(args.rounds):
            order = list(enumerate(names))
            for i, name in order if r % 2 == 0 else order[::-1]:
                server: AbstractContextManager[dict[str, str]]
                if name == "triton":
                    server = run.serve_triton(args, work / f"triton-{r}", "mlp-batch", model, 64, 1)
                else:
                    server = run.serve(work / f"s{i}" / "repo", {"PYTHONPATH": name})
                with server as urls:
                    run.load(urls, "mlp-batch", payload, args.transport, args.concurrency, 2, 1)  # warm-up
                    got = run.load(urls, "mlp-batch", payload, args.transport, args.concurrency, args.duration, 1)
                if "error" in got:
                    sys.exit(f"{name}: {got['error']}")
                rows.setdefault(name, []).append(got)
                print(f"round {r + 1}: {name}: {got['rps']} req/s, p50 {got['p50_ms']} ms, "
                      f"server CPU {got['server_cpu_us_per_req']} µs/request", flush=True)
    print(f"\nMLP mlp-batch, {args.transport} c={args.concurrency}, medians of {args.rounds} rounds")
    for name, rs in rows.items():
        def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
            return statistics.median(float(x[key]) for x in rs)
        print(f"{name:40} {med('rps'):9.1f} req/s   p50 {med('p50_ms'):7.3f} ms   "
              f"server CPU {med('server_cpu_us_per_req'):6.1f} µs/request")


if __name__ == "__main__":
    main()
