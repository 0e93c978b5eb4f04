"""Tiny real ONNX models built with onnx.helper, and model-folder writers for tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> bytes:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def identity_model(dtype: int = TensorProto.FLOAT, shape: list[Any] | None = None,
                   in_name: str = "x", out_name: str = "y") -> bytes:
    """y = x, any dtype (incl. strings and bools)."""
    shape = shape if shape is not None else ["batch", "n"]
    x = helper.make_tensor_value_info(in_name, dtype, shape)
    y = helper.make_tensor_value_info(out_name, dtype, shape)
    return _model(helper.make_graph([helper.make_node("Identity", [in_name], [out_name])], "identity", [x], [y]))


def add_model(scale: float = 1.0, features: int = 4) -> bytes:
    """out = (a + b) * scale; a, b: FP32 [batch, features]."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", features])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", features])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", features])
    s = numpy_helper.from_array(np.array([scale], dtype=np.float32), "scale")
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["sum", "scale"], ["out"])]
    return _model(helper.make_graph(nodes, "add", [a, b], [out], initializer=[s]))


def mlp_model(features: int = 32, hidden: int = 64, classes: int = 2, seed: int = 0) -> bytes:
    """A small tabular MLP: FP32 [batch, features] → softmax probabilities [batch, classes]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32) * 0.1, "w1")
    b1 = numpy_helper.from_array(np.zeros(hidden, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32) * 0.1, "w2")
    b2 = numpy_helper.from_array(np.zeros(classes, np.float32), "b2")
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return _model(helper.make_graph(nodes, "mlp", [x], [y], initializer=[w1, b1, w2, b2]))


def sleep_model() -> bytes:
    """A model that is slow on purpose: a large MatMul chain on [batch, 512]."""
    rng = np.random.default_rng(1)
    inits, nodes, prev = [], [], "x"
    for i in range(8):
        w = numpy_helper.from_array(rng.standard_normal((512, 512)).astype(np.float32) * 0.01, f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 512])
    return _model(helper.make_graph(nodes, "slow", [x], [y], initializer=inits))


def slow_request(batch: int) -> tuple[bytes, dict[str, str]]:
    """A binary v2 request for the sleep model: big enough to keep a version busy."""
    x = np.full((batch, 512), 0.01, np.float32)
    header = (f'{{"inputs": [{{"name": "x", "shape": [{batch}, 512], "datatype": "FP32", '
              f'"parameters": {{"binary_data_size": {x.nbytes}}}}}], '
              '"outputs": [{"name": "y", "parameters": {"binary_data": true}}]}').encode()
    return header + x.tobytes(), {"inference-header-content-length": str(len(header))}


def write_model(repo: Path, name: str, onnx_bytes: bytes, spec: dict[str, Any] | None = None,
                version: int = 1, checksum: bool = False) -> Path:
    """Write REPO/NAME/model.yaml and REPO/NAME/VERSION/model.onnx; returns the model folder."""
    mdir = repo / name
    vdir = mdir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "model.onnx").write_bytes(onnx_bytes)
    doc: dict[str, Any] = {"name": name, "backend": "onnxruntime", **(spec or {})}
    if checksum:
        doc.setdefault("files", {}).setdefault("sha256", {})[f"{version}/model.onnx"] = (
            hashlib.sha256(onnx_bytes).hexdigest()
        )
    if spec is not None or checksum or not (mdir / "model.yaml").exists():
        (mdir / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return mdir
