"""What ``backend: upstream`` adds to a call: the 32-feature MLP of ``bench/models.py`` served by
one ``inhouse serve`` (the back server), called directly and through a second one (the front
server, whose ``mlp`` is ``backend: upstream`` pointing at the back server's), both
subprocesses, loaded by ``bench/loadgen.py`` in the same run. Each round measures direct and
through back to back, alternating which goes first.

    python bench/bench_upstream.py [--duration 4] [--concurrency 1,8] [--rounds 3]

Prints, per concurrency, the medians of p50 and requests/s for both, the added p50 (through −
direct) and the throughput ratio (through ÷ direct)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_security import loadgen, mlp_payload, mlp_repo, start, wait_ready  # noqa: E402


def front_repo(root: Path, back_url: str) -> Path:
    (root / "mlp" / "1").mkdir(parents=True)
    spec = {"name": "mlp", "backend": "upstream", "upstream": {"url": back_url, "model": "mlp"}}
    (root / "mlp" / "model.yaml").write_text(yaml.safe_dump(spec))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        payload = mlp_payload(tmp / "mlp.json")
        back, back_url = start(mlp_repo(tmp / "back", policy=False), tmp / "back-data", secured=False)
        procs = [back]
        try:
            wait_ready(back_url, back, {})
            front, front_url = start(front_repo(tmp / "front", back_url), tmp / "front-data", secured=False)
            procs.append(front)
            wait_ready(front_url, front, {})
            targets = {"direct": (back_url, back.pid), "through": (front_url, front.pid)}
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for r in range(args.rounds):
                for c in levels:
                    order = ["direct", "through"] if r % 2 == 0 else ["through", "direct"]
                    for mode in order:
                        url, pid = targets[mode]
                        res = loadgen(url, pid, payload, c, args.duration, args.warmup, [])
                        runs.setdefault((mode, c), []).append(res)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
    print(f"\nMLP, direct vs through backend: upstream, median of {args.rounds} rounds (bench/loadgen.py):")
    print(f"{'c':>4} {'direct p50 ms':>14} {'through p50 ms':>15} {'added p50 ms':>13} "
          f"{'direct req/s':>13} {'through req/s':>14} {'ratio':>6}")
    for c in levels:
        d, t = runs[("direct", c)], runs[("through", c)]
        dp, tp = statistics.median(x["p50_ms"] for x in d), statistics.median(x["p50_ms"] for x in t)
        dr, tr = statistics.median(x["rps"] for x in d), statistics.median(x["rps"] for x in t)
        print(f"{c:>4} {dp:>14.3f} {tp:>15.3f} {tp - dp:>13.3f} {dr:>13.0f} {tr:>14.0f} {tr / dr:>6.2f}")


if __name__ == "__main__":
    main()
