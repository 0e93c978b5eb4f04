"""A Triton model folder's ``config.pbtxt`` read as a model spec, so a folder copied from a Triton
repository (``config.pbtxt`` + ``1/model.onnx``) serves as it is.

Only the protobuf text format subset model configs use is parsed here (the core does not import
the generated messages, which live with the protocol adapters). The fields inhouse can honour
are mapped onto model.yaml's; any other is refused by name, so nothing is silently dropped."""

from __future__ import annotations

import difflib
import re
from typing import Any

from inhouse.errors import ModelFormatError, ModelSpecError

_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|(?P<punct>[{}\[\]:,;<>])|'
                    r"(?P<word>[A-Za-z0-9_.+\-]+)")
_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "onnxruntime": "onnxruntime"}
_KEYS = ("name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching",
         "instance_group", "default_model_filename", "version_policy")


def _tokens(text: str, source: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise ModelSpecError(f"{source} is not valid protobuf text at line {line}: {text[pos:pos + 20]!r}.")
        pos = m.end()
        tok = m.group("str") or m.group("punct") or m.group("word")
        if tok:
            out.append(tok)
    return out


def _scalar(tok: str) -> Any:
    if tok[0] in "\"'":
        return tok[1:-1].encode().decode("unicode_escape")
    if re.fullmatch(r"[+-]?\d+", tok):
        return int(tok)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", tok):
        return float(tok)
    if tok in ("true", "True"):
        return True
    if tok in ("false", "False"):
        return False
    return tok  # an enum name such as TYPE_FP32 or KIND_GPU


class _Parser:
    def __init__(self, tokens: list[str], source: str) -> None:
        self._t = tokens
        self._i = 0
        self._source = source

    def _fail(self, what: str) -> ModelSpecError:
        near = " ".join(self._t[max(0, self._i - 3):self._i + 3])
        return ModelSpecError(f"{self._source} is not valid protobuf text: {what} near '{near}'.")

    def _next(self) -> str:
        if self._i >= len(self._t):
            raise self._fail("unexpected end")
        tok = self._t[self._i]
        self._i += 1
        return tok

    def _peek(self) -> str | None:
        return self._t[self._i] if self._i < len(self._t) else None

    def message(self, end: str | None) -> dict[str, list[Any]]:
        fields: dict[str, list[Any]] = {}
        while (tok := self._peek()) != end:
            if tok is None:
                raise self._fail(f"missing '{end}'")
            name = self._next()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise self._fail(f"'{name}' is not a field name")
            if self._peek() == ":":
                self._next()
            fields.setdefault(name, []).extend(self._values())
            if self._peek() in (",", ";"):
                self._next()
        if end is not None:
            self._next()
        return fields

    def _values(self) -> list[Any]:
        tok = self._next()
        if tok in ("{", "<"):
            return [self.message("}" if tok == "{" else ">")]
        if tok == "[":
            items: list[Any] = []
            while self._peek() != "]":
                items.extend(self._values())
                if self._peek() == ",":
                    self._next()
            self._next()
            return items
        if tok in "}]>:,;":
            raise self._fail(f"unexpected '{tok}'")
        return [_scalar(tok)]


def parse_pbtxt(text: str, source: str) -> dict[str, list[Any]]:
    """Each field's values (a repeated field's in order; messages as nested dicts)."""
    return _Parser(_tokens(text, source), source).message(None)


def _one(fields: dict[str, list[Any]], key: str, default: Any = None) -> Any:
    values = fields.get(key)
    return values[-1] if values else default


def _tensor(t: dict[str, list[Any]], batched: bool, source: str) -> dict[str, Any]:
    dtype = str(_one(t, "data_type", ""))
    if not dtype.startswith("TYPE_"):
        raise ModelSpecError(f"{source}: tensor '{_one(t, 'name', '?')}' needs a data_type such as TYPE_FP32.")
    dims = [int(d) for d in t.get("dims", [])]
    out: dict[str, Any] = {"name": _one(t, "name", ""), "dtype": "BYTES" if dtype == "TYPE_STRING" else dtype[5:],
                           "shape": ([-1] if batched else []) + dims}
    if _one(t, "optional", False):
        out["optional"] = True
    return out


def spec_from_pbtxt(text: str, source: str) -> dict[str, Any]:
    """model.yaml's keys for a Triton ``config.pbtxt``; Triton's batch convention (with
    ``max_batch_size > 0`` the batch dimension is implied) becomes a leading -1."""
    fields = parse_pbtxt(text, source)
    unknown = [k for k in fields if k not in _KEYS]
    if unknown:
        hints = [f"'{k}'" + (f" (did you mean '{g[0]}'?)" if (g := difflib.get_close_matches(k, _KEYS, n=1)) else "")
                 for k in unknown]
        raise ModelSpecError(f"{source}: {', '.join(hints)} {'is' if len(hints) == 1 else 'are'} not supported by "
                             f"inhouse (supported: {', '.join(_KEYS)}); remove it, or write a model.yaml instead.")
    engine = str(_one(fields, "backend") or _one(fields, "platform") or "onnxruntime")
    backend = _BACKENDS.get(engine)
    if backend is None:
        raise ModelFormatError(f"{source}: Triton {engine!r} models are not served by inhouse; it serves "
                               "ONNX (platform onnxruntime_onnx). Convert the model with 'inhouse convert'.")
    max_batch = int(_one(fields, "max_batch_size", 0))
    spec: dict[str, Any] = {"backend": backend}
    if _one(fields, "name"):
        spec["name"] = _one(fields, "name")
    if "input" in fields:
        spec["inputs"] = [_tensor(t, max_batch > 0, source) for t in fields["input"]]
    if "output" in fields:
        spec["outputs"] = [_tensor(t, max_batch > 0, source) for t in fields["output"]]
    batching: dict[str, Any] = {"max_batch_size": max_batch}
    dyn = _one(fields, "dynamic_batching")
    if isinstance(dyn, dict):
        if "preferred_batch_size" in dyn:
            batching["preferred_batch_sizes"] = [int(b) for b in dyn["preferred_batch_size"]]
        if "max_queue_delay_microseconds" in dyn:
            batching["max_queue_delay_ms"] = int(_one(dyn, "max_queue_delay_microseconds")) / 1000
    spec["batching"] = batching
    groups = fields.get("instance_group", [])
    if groups:
        g = groups[0]
        kind = str(_one(g, "kind", "KIND_CPU"))
        spec["instances"] = {"count": int(_one(g, "count", 1)),
                             "device": "cuda" if kind == "KIND_GPU" else "cpu"}
    if _one(fields, "default_model_filename"):
        spec["onnxruntime"] = {"file": _one(fields, "default_model_filename")}
    policy = _one(fields, "version_policy")
    if isinstance(policy, dict):
        if "all" in policy:
            spec["versions"] = {"policy": "all"}
        elif "specific" in policy:
            spec["versions"] = {"policy": "specific",
                                "versions": [int(v) for v in _one(policy, "specific", {}).get("versions", [])]}
        elif "latest" in policy:
            spec["versions"] = {"policy": "latest", "keep": int(_one(_one(policy, "latest", {}), "num_versions", 1))}
    return spec
