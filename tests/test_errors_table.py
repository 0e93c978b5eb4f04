"""The README's error table documents every error class: code, HTTP status and gRPC status."""

from __future__ import annotations

import re
from pathlib import Path

from inhouse.errors import error_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_rows() -> list[tuple[set[int], set[int], set[str]]]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Errors"):]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d{4}( / \d{4})*", cells[0]):
            codes = {int(c) for c in cells[0].split(" / ")}
            statuses = {int(c) for c in re.findall(r"\d{3}", cells[2])}
            grpc = {g.strip() for g in cells[3].split("/")}
            rows.append((codes, statuses, grpc))
    return rows


def test_every_error_class_is_documented() -> None:
    rows = _readme_rows()
    assert rows, "README has no error table"
    for code, cls, http, grpc in error_table():
        matching = [r for r in rows if code in r[0]]
        assert matching, f"error {code} ({cls}) is missing from README's error table"
        assert any(http in r[1] and grpc in r[2] for r in matching), (
            f"README documents {code} ({cls}) with another HTTP/gRPC status than {http}/{grpc}")
