"""One row of the fault-and-abuse table, and its printing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Row:
    """What one fault or abuse did: the figure measured against the issue's target."""

    fault: str  # e.g. "overload: concurrency 512 against max_queue_size 64"
    figure: str  # what was measured, e.g. "p99 time to the 429 / admitted p99"
    target: str  # e.g. "< 10 ms; bounded"
    measured: str  # the figure as text, e.g. "3.1 ms / 220 ms"
    ok: bool  # measured meets target
    detail: str = ""  # counts behind the figure, for the note


def render(rows: Sequence[Row]) -> str:
    """A Markdown table, one line per row, in the order given."""
    lines = [
        "| fault or abuse | figure | target | measured | ok |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "yes" if r.ok else "**NO**"
        lines.append(f"| {r.fault} | {r.figure} | {r.target} | {r.measured} | {mark} |")
    return "\n".join(lines)


def to_json(rows: Sequence[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2)
