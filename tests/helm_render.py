"""A small renderer for the subset of Helm's Go templates that deploy/helm/inhouse uses
(helm itself is not installable here). Supported: ``{{ }}`` with ``-`` trimming, ``define`` /
``include``, ``if`` / ``else if`` / ``else``, ``range``, pipelines, and the functions
``toYaml nindent indent quote default not and or eq ne lower upper int toString required``.
Anything else raises, so a template that strays from the subset fails its test loudly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|\||[^\s()|]+')


class TemplateError(Exception):
    pass


def _truthy(v: Any) -> bool:
    return v not in (None, False, 0, "", [], {}) and not (isinstance(v, (dict, list, str)) and len(v) == 0)


def _to_yaml(v: Any) -> str:
    if v in ({}, [], None):
        return {dict: "{}", list: "[]"}.get(type(v), "null") if v is not None else "null"
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip("\n")


def _indent(n: Any, s: Any) -> str:
    pad = " " * int(n)
    return "\n".join(pad + line if line else line for line in str(s).split("\n"))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _quote(v: Any) -> str:
    return '"' + _fmt(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _required(msg: str, v: Any) -> Any:
    if not _truthy(v):
        raise TemplateError(msg)
    return v


class Chart:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = yaml.safe_load((root / "Chart.yaml").read_text())
        self.defaults = yaml.safe_load((root / "values.yaml").read_text())
        self.defines: dict[str, list[Any]] = {}
        self.templates: dict[str, list[Any]] = {}
        for path in sorted((root / "templates").iterdir()):
            if path.suffix not in (".yaml", ".tpl"):
                continue
            nodes = self._parse(path.read_text(), path.name)
            if path.suffix == ".yaml":
                self.templates[path.name] = nodes

    # ---- parsing ----
    def _lex(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        pos = 0
        trim_next = False
        for m in _ACTION.finditer(text):
            chunk = text[pos:m.start()]
            if trim_next:
                chunk = chunk.lstrip()
            if m.group(1):
                chunk = chunk.rstrip()
            out.append(("text", chunk))
            out.append(("action", m.group(2)))
            trim_next = bool(m.group(3))
            pos = m.end()
        tail = text[pos:]
        out.append(("text", tail.lstrip() if trim_next else tail))
        return out

    def _parse(self, text: str, name: str) -> list[Any]:
        tokens = self._lex(text)
        root: list[Any] = []
        stack: list[tuple[str, Any]] = [("root", root)]

        def body() -> list[Any]:
            kind, node = stack[-1]
            if kind == "if":
                return node["branches"][-1][1]
            if kind == "range":
                return node["body"]
            if kind == "define":
                return node
            return node

        for kind, value in tokens:
            if kind == "text":
                if value:
                    body().append(("text", value))
                continue
            word = value.split(None, 1)[0] if value else ""
            rest = value[len(word):].strip()
            if word == "define":
                nodes: list[Any] = []
                self.defines[rest.strip('"')] = nodes
                stack.append(("define", nodes))
            elif word == "if":
                node = {"branches": [(rest, [])]}
                body().append(("if", node))
                stack.append(("if", node))
            elif word == "else":
                if stack[-1][0] != "if":
                    raise TemplateError(f"{name}: else outside if")
                cond = rest[2:].strip() if rest.startswith("if") else "true"
                stack[-1][1]["branches"].append((cond, []))
            elif word == "range":
                m = re.match(r"(?:\$(\w+)\s*,\s*\$(\w+)\s*:=\s*|\$(\w+)\s*:=\s*)?(.*)", rest)
                assert m
                node = {"key": m.group(1), "val": m.group(2) or m.group(3), "expr": m.group(4), "body": []}
                body().append(("range", node))
                stack.append(("range", node))
            elif word == "end":
                if len(stack) == 1:
                    raise TemplateError(f"{name}: end without block")
                stack.pop()
            elif value.startswith("/*"):
                continue
            else:
                body().append(("expr", value))
        if len(stack) != 1:
            raise TemplateError(f"{name}: unclosed {stack[-1][0]}")
        return root

    # ---- evaluation ----
    def _resolve(self, token: str, dot: Any, env: dict[str, Any]) -> Any:
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token in ("nil",):
            return None
        if token == ".":
            return dot
        if token.startswith("$"):
            name, _, path = token[1:].partition(".")
            base = env[name] if name else env[""]
            return self._walk(base, path)
        if token.startswith("."):
            return self._walk(dot, token[1:])
        raise TemplateError(f"cannot evaluate '{token}'")

    @staticmethod
    def _walk(base: Any, path: str) -> Any:
        cur = base
        for part in [p for p in path.split(".") if p]:
            cur = cur.get(part) if isinstance(cur, dict) else None
        return cur

    def _call(self, fn: str, args: list[Any], dot: Any) -> Any:
        fns: dict[str, Any] = {
            "toYaml": _to_yaml, "nindent": lambda n, s: "\n" + _indent(n, s), "indent": _indent,
            "quote": _quote, "default": lambda d, v=None: v if _truthy(v) else d, "not": lambda v: not _truthy(v),
            "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1]),
            "or": lambda *a: next((x for x in a if _truthy(x)), a[-1]), "eq": lambda a, b: a == b,
            "ne": lambda a, b: a != b, "lower": lambda s: _fmt(s).lower(), "upper": lambda s: _fmt(s).upper(),
            "int": lambda v: int(v or 0), "toString": _fmt, "required": _required,
            "include": lambda name, ctx: self._render(self.defines[name], ctx, {"": ctx}),
        }
        if fn not in fns:
            raise TemplateError(f"function '{fn}' is outside the supported subset")
        return fns[fn](*args)

    def _command(self, tokens: list[str], dot: Any, env: dict[str, Any], piped: list[Any]) -> Any:
        args: list[Any] = []
        i = 0
        head = tokens[0] if tokens else ""
        is_fn = bool(re.fullmatch(r"[A-Za-z_]\w*", head)) and head not in ("true", "false", "nil")
        start = 1 if is_fn else 0
        i = start
        while i < len(tokens):
            t = tokens[i]
            if t == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                    j += 1
                args.append(self._pipeline(tokens[i + 1:j - 1], dot, env))
                i = j
                continue
            args.append(self._resolve(t, dot, env))
            i += 1
        if is_fn:
            return self._call(head, args + piped, dot)
        if piped or len(args) != 1:
            raise TemplateError(f"bad expression {' '.join(tokens)}")
        return args[0]

    def _pipeline(self, tokens: list[str], dot: Any, env: dict[str, Any]) -> Any:
        parts: list[list[str]] = [[]]
        depth = 0
        for t in tokens:
            if t == "|" and depth == 0:
                parts.append([])
                continue
            depth += {"(": 1, ")": -1}.get(t, 0)
            parts[-1].append(t)
        value = self._command(parts[0], dot, env, [])
        for cmd in parts[1:]:
            value = self._command(cmd, dot, env, [value])
        return value

    def _eval(self, expr: str, dot: Any, env: dict[str, Any]) -> Any:
        return self._pipeline(_TOKEN.findall(expr), dot, env)

    def _render(self, nodes: list[Any], dot: Any, env: dict[str, Any]) -> str:
        out: list[str] = []
        for kind, node in nodes:
            if kind == "text":
                out.append(node)
            elif kind == "expr":
                out.append(_fmt(self._eval(node, dot, env)))
            elif kind == "if":
                for cond, branch in node["branches"]:
                    if _truthy(self._eval(cond, dot, env)):
                        out.append(self._render(branch, dot, env))
                        break
            elif kind == "range":
                coll = self._eval(node["expr"], dot, env) or []
                items = sorted(coll.items()) if isinstance(coll, dict) else list(enumerate(coll))
                for k, v in items:
                    scope = {**env}
                    if node["key"]:
                        scope[node["key"]] = k
                    if node["val"]:
                        scope[node["val"]] = v
                    out.append(self._render(node["body"], v, scope))
        return "".join(out)

    def render(self, values: dict[str, Any] | None = None, release: str = "demo",
               namespace: str = "default") -> dict[str, list[dict[str, Any]]]:
        """Render every template with the chart's values merged with ``values``; returns the
        parsed YAML documents per template file (empty ones dropped)."""
        merged = _merge(self.defaults, values or {})
        ctx = {"Values": merged, "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
               "Chart": {"Name": self.meta["name"], "Version": self.meta["version"],
                         "AppVersion": self.meta.get("appVersion", "")}}
        result = {}
        for name, nodes in self.templates.items():
            text = self._render(nodes, ctx, {"": ctx})
            docs = [d for d in yaml.safe_load_all(text) if d]
            result[name] = docs
        return result


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return over


def set_values(pairs: list[str]) -> dict[str, Any]:
    """``--set a.b=c`` pairs as a nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return out
