"""Facts about ONNX graphs that the tooling needs: the opset the installed onnxruntime runs,
a graph's inputs and outputs as model.yaml tensors, and writing a model folder."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import onnx
import yaml
from onnx import TensorProto, helper

from inhouse.core.spec import find_spec_file
from inhouse.errors import ConversionError, ModelFormatError

_ELEM_TO_V2 = {
    TensorProto.BOOL: "BOOL", TensorProto.UINT8: "UINT8", TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64", TensorProto.INT8: "INT8",
    TensorProto.INT16: "INT16", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
    TensorProto.FLOAT16: "FP16", TensorProto.FLOAT: "FP32", TensorProto.DOUBLE: "FP64",
    TensorProto.STRING: "BYTES",
}
PREFERRED_OPSET = 18


@functools.cache
def max_runtime_opset() -> int:
    """The newest default-domain opset the installed onnxruntime can load, found by asking it
    (no version table to keep up to date)."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = min(model.ir_version, 10)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: S112 - probing: an unsupported opset fails, try the next one down
            continue
        return opset
    raise ModelFormatError("The installed onnxruntime loads no ONNX opset at all; reinstall onnxruntime.")


def choose_opset(requested: int | None) -> int:
    """``requested`` if this onnxruntime runs it, else the preferred opset capped by what it runs."""
    limit = max_runtime_opset()
    if requested is None:
        return min(PREFERRED_OPSET, limit)
    if requested > limit:
        raise ModelFormatError(
            f"ONNX opset {requested} is newer than the installed onnxruntime supports (up to {limit}); "
            f"choose --opset {limit} or lower, or upgrade onnxruntime."
        )
    if requested < 7:
        raise ModelFormatError(f"ONNX opset {requested} is too old; choose 7 to {limit}.")
    return requested


def merge_opset_imports(model: onnx.ModelProto) -> onnx.ModelProto:
    """One opset import per domain, the highest version: skl2onnx can list the default domain
    twice, which onnxruntime serves but its quantizer refuses ("Failed to find proper ai.onnx
    domain")."""
    best: dict[str, int] = {}
    for o in model.opset_import:
        domain = "" if o.domain == "ai.onnx" else o.domain
        best[domain] = max(best.get(domain, 0), o.version)
    if len(best) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(d, v) for d, v in best.items())
    return model


def check_runtime_loads(onnx_bytes: bytes) -> None:
    """Fail with code 1001 when the installed onnxruntime cannot load the graph."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ModelFormatError(f"The converted model does not load in onnxruntime {ort.__version__}: {err}") from None


def _tensors(values: Any) -> list[dict[str, Any]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dtype = _ELEM_TO_V2.get(t.elem_type)
        if dtype is None:
            raise ConversionError(
                f"Graph tensor '{v.name}' has ONNX element type {t.elem_type}, which KServe v2 cannot carry."
            )
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim]
        out.append({"name": v.name, "dtype": dtype, "shape": dims})
    return out


def graph_io(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as model.yaml tensor entries; initialisers listed as inputs are skipped."""
    inits = {i.name for i in model.graph.initializer}
    return _tensors([i for i in model.graph.input if i.name not in inits]), _tensors(model.graph.output)


def versions_in(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def read_spec_doc(model_dir: Path) -> dict[str, Any]:
    path = find_spec_file(model_dir)
    if path is None:
        return {}
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict):
        raise ConversionError(f"{path} must be a mapping of keys to values.")
    return doc


def write_version(model_dir: Path, onnx_bytes: bytes, spec_updates: dict[str, Any],
                  version: int | None = None, filename: str = "model.onnx") -> tuple[int, Path]:
    """Write ``model_dir/VERSION/filename`` (the next free version unless given) and create or
    update model.yaml: name, backend, the given keys, and the file's sha256. Other keys a user
    wrote by hand are kept."""
    model_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = (versions_in(model_dir) or [0])[-1] + 1
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    artefact = vdir / filename
    tmp = artefact.with_suffix(".onnx.tmp")
    tmp.write_bytes(onnx_bytes)
    tmp.replace(artefact)
    doc = read_spec_doc(model_dir)
    doc.setdefault("name", model_dir.name)
    doc.setdefault("backend", "onnxruntime")
    doc.update(spec_updates)
    sha = doc.setdefault("files", {}).setdefault("sha256", {})
    sha[f"{version}/{filename}"] = hashlib.sha256(onnx_bytes).hexdigest()
    spec_path = find_spec_file(model_dir) or model_dir / "model.yaml"
    spec_path.write_text(yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")
    return version, artefact
