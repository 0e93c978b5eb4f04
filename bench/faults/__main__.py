"""``python -m bench.faults [--quick] [--only NAME,...] [--json PATH]``: every ``case_*.py``
module's rows in one table; exit status 1 when a row misses its target.

``--only`` names case modules (``lifecycle``, ``abuse``) or single cases inside a module that
lists them in ``CASES`` (e.g. ``soak``, ``sigkill``)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path

from bench.faults.table import Row, render, to_json

HERE = Path(__file__).parent


def modules() -> list[str]:
    return sorted(p.stem for p in HERE.glob("case_*.py"))


def run_all(quick: bool, only: set[str] | None) -> list[Row]:
    rows: list[Row] = []
    for stem in modules():
        mod = importlib.import_module(f"bench.faults.{stem}")
        short = stem.removeprefix("case_")
        cases = set(getattr(mod, "CASES", {}))
        chosen = None if not only or short in only else only & cases
        if chosen is not None and not chosen:
            continue
        started = time.monotonic()
        if chosen is not None and "only" in inspect.signature(mod.run).parameters:
            rows += mod.run(quick, only=chosen)
        else:
            rows += mod.run(quick)
        print(f"[{short}: {time.monotonic() - started:.0f} s]", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller loads (the slow-marked test runs this)")
    p.add_argument("--only", default="", help="comma-separated case modules or cases")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    only = {n.strip() for n in args.only.split(",") if n.strip()} or None
    rows = run_all(args.quick, only)
    print(render(rows))
    for r in rows:
        if r.detail:
            print(f"- {r.fault}: {r.detail}")
    if args.json is not None:
        args.json.write_text(to_json(rows))
    return 0 if rows and all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
