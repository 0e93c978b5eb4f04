"""The module graph stays a graph that points down: no import loops among inhouse's modules
(imports inside functions and ``TYPE_CHECKING`` blocks included), and no arrows from the lower
layers up to the ones built on them."""

from __future__ import annotations

import ast
from pathlib import Path

import inhouse

ROOT = Path(inhouse.__file__).parent

# (importer prefix, imported prefix) pairs that would point up
UPWARD = [
    ("inhouse.core", "inhouse.security"), ("inhouse.core", "inhouse.protocols"),
    ("inhouse.settings", "inhouse.security"), ("inhouse.settings", "inhouse.protocols"),
    ("inhouse.observability", "inhouse.protocols"),
    ("inhouse.security", "inhouse.protocols"), ("inhouse.llm", "inhouse.protocols"),
    # transports sit on top: nothing below them reaches up into a front end
    *((low, "inhouse.transports") for low in ("inhouse.core", "inhouse.settings", "inhouse.security",
                                              "inhouse.observability", "inhouse.llm", "inhouse.protocols",
                                              "inhouse.backends")),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                target = owner(name) if name.startswith("inhouse") else None
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                out.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loops() -> None:
    assert _loops(_graph()) == []


def test_no_upward_imports() -> None:
    graph = _graph()
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    for low, high in UPWARD if (m == low or m.startswith(low + ".")) and t.startswith(high))
    assert upward == []


def test_only_the_cli_imports_the_server() -> None:
    graph = _graph()
    # `inhouse serve`, and the entry of one worker process that `inhouse serve --workers N` starts
    assert sorted(m for m, targets in graph.items() if "inhouse.server" in targets) == [
        "inhouse.cli.serve", "inhouse.workers.child"]
