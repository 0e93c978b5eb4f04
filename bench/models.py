"""Benchmark models built with onnx.helper (random weights, no download):

* ``encoder``: a BERT-like encoder — 6 layers, hidden 384, 12 heads, FFN 1536, sequence 128,
  dynamic batch; inputs ``input_ids`` / ``attention_mask`` (INT64 [-1, -1]), output ``logits``
  (FP32 [-1, 2]) from the first token.
* ``mlp``: a tabular risk-scoring MLP, 32 features → 64 → 2 classes (softmax)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def weight(self, *shape: int, scale: float = 0.02) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), "w")

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        return self.op("Add", [self.op("MatMul", [x, self.weight(d_in, d_out)]),
                               self.const(np.zeros(d_out, np.float32), "b")])

    def layer_norm(self, x: str, d: int) -> str:
        return self.op("LayerNormalization", [x, self.const(np.ones(d, np.float32), "g"),
                                              self.const(np.zeros(d, np.float32), "beta")], axis=-1, epsilon=1e-12)


def _finish(g: _Graph, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
            name: str) -> bytes:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    data: bytes = m.SerializeToString()
    return data


def encoder_model(layers: int = 6, hidden: int = 384, heads: int = 12, ffn: int = 1536, vocab: int = 8192,
                  max_len: int = 512, classes: int = 2, seed: int = 0) -> bytes:
    g = _Graph(seed)
    head_dim = hidden // heads
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    tok = g.op("Gather", [g.weight(vocab, hidden), "input_ids"])
    # position embeddings: positions 0..seq-1 sliced from a table
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(np.array(1, np.int64))])
    positions = g.op("Range", [g.const(np.array(0, np.int64)), seq_len, g.const(np.array(1, np.int64))])
    pos = g.op("Gather", [g.weight(max_len, hidden), positions])
    x = g.layer_norm(g.op("Add", [tok, pos]), hidden)
    # additive attention mask [batch, 1, 1, seq]
    m = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const(np.array(1.0, np.float32)), m])
    bias = g.op("Mul", [inverted, g.const(np.array(-10000.0, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const(np.array([1, 2], np.int64))])
    split_shape = g.const(np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = g.const(np.array([0, 0, hidden], np.int64))
    scale = g.const(np.array(1.0 / np.sqrt(head_dim), np.float32))
    for _ in range(layers):
        def heads_of(t: str) -> str:
            return g.op("Transpose", [g.op("Reshape", [t, split_shape])], perm=[0, 2, 1, 3])

        q = heads_of(g.linear(x, hidden, hidden))
        k = heads_of(g.linear(x, hidden, hidden))
        v = heads_of(g.linear(x, hidden, hidden))
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
        probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape])
        x = g.layer_norm(g.op("Add", [x, g.linear(ctx, hidden, hidden)]), hidden)
        h = g.linear(x, hidden, ffn)
        erf = g.op("Erf", [g.op("Div", [h, g.const(np.array(np.sqrt(2.0), np.float32))])])
        gelu = g.op("Mul", [g.op("Mul", [h, g.const(np.array(0.5, np.float32))]),
                            g.op("Add", [g.const(np.array(1.0, np.float32)), erf])])
        x = g.layer_norm(g.op("Add", [x, g.linear(gelu, ffn, hidden)]), hidden)
    cls = g.op("Gather", [x, g.const(np.array(0, np.int64))], axis=1)
    pooled = g.op("Tanh", [g.linear(cls, hidden, hidden)])
    out = g.linear(pooled, hidden, classes)
    g.nodes.append(helper.make_node("Identity", [out], ["logits"]))
    return _finish(g, [ids, mask], [logits], "encoder")


def mlp_model(features: int = 32, hidden: int = 64, classes: int = 2, seed: int = 0) -> bytes:
    g = _Graph(seed)
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    h = g.op("Relu", [g.linear("features", features, hidden)])
    g.nodes.append(helper.make_node("Softmax", [g.linear(h, hidden, classes)], ["probabilities"], axis=1))
    return _finish(g, [x], [y], "mlp")


def write(repo: Path, name: str, onnx_bytes: bytes, spec: dict[str, Any]) -> Path:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "1" / "model.onnx").write_bytes(onnx_bytes)
    (repo / name / "model.yaml").write_text(yaml.safe_dump({"name": name, "backend": "onnxruntime", **spec}))
    return repo / name


MLP_SPEC: dict[str, Any] = {"onnxruntime": {"intra_op_threads": 1, "spinning": False}, "warmup": {"samples": 8}}
"""How the benchmarks serve the MLP: one intra-op thread, no spinning (as Triton's peer runs it)."""
MLP_BATCHING: dict[str, Any] = {"max_batch_size": 64, "preferred_batch_sizes": [16, 32, 64], "max_queue_delay_ms": 1,
                                "max_queue_size": 2048, "default_timeout_ms": 2000, "priority_levels": 2}


def write_mlp(repo: Path, names: tuple[str, ...] = ("mlp", "mlp-batch")) -> bytes:
    """The MLP in ``repo`` as ``mlp`` (batching off) and / or ``mlp-batch`` (``MLP_BATCHING``);
    returns the ONNX bytes."""
    model = mlp_model()
    for name in names:
        write(repo, name, model, {**MLP_SPEC, "batching": MLP_BATCHING} if name == "mlp-batch" else MLP_SPEC)
    return model


def encoder_inputs(batch: int, seq: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1, 8192, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64)}


def mlp_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"features": np.random.default_rng(seed).standard_normal((batch, 32)).astype(np.float32)}
