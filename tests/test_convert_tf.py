"""inhouse convert on TensorFlow SavedModels: Keras and tf.function models saved here, converted
with tf2onnx, checked against TensorFlow, then served and called over v2.

TensorFlow is a 270 MB optional extra ([convert-tf]) that the default test install leaves out:
these tests are marked slow and run with ``bash scripts/test-tf.sh``, which installs it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.client import InhouseClient
from inhouse.errors import ConversionError
from inhouse.tools.convert import ConvertOptions, convert

pytestmark = pytest.mark.slow
tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
runner = CliRunner()


def _diff(output: str) -> float:
    m = re.search(r"verified against tensorflow: max abs diff (\S+)", output)
    assert m, output
    return float(m.group(1))


def _keras_dense() -> object:
    keras = tf.keras
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(6,), name="features")
    x = keras.layers.Dense(16, activation="relu")(inp)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    return keras.Model(inp, out)


def test_keras_dense_model_with_dynamic_batch(tmp_path: Path) -> None:
    model = _keras_dense()
    saved = tmp_path / "dense-saved"
    model.export(str(saved), verbose=False)
    out = tmp_path / "repo" / "dense"
    res = runner.invoke(app, ["convert", str(saved), "--out", str(out)])
    assert res.exit_code == 0, res.output
    diff = _diff(res.output)
    print(f"Keras dense (dynamic batch): ONNX vs TensorFlow max abs diff {diff:.3g}")
    assert diff < 1e-5
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert [(t["dtype"], t["shape"]) for t in spec["inputs"]] == [("FP32", [-1, 6])]
    assert [(t["dtype"], t["shape"]) for t in spec["outputs"]] == [("FP32", [-1, 3])]
    in_name, out_name = spec["inputs"][0]["name"], spec["outputs"][0]["name"]
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)  # a batch size never seen
    expected = model(x).numpy()
    with run_server(out.parent) as srv, InhouseClient(srv.url) as c:
        got, _ = c.infer("dense", {in_name: x})
    np.testing.assert_allclose(got[out_name], expected, atol=1e-5)


def test_keras_model_behind_a_fixed_batch_signature(tmp_path: Path) -> None:
    """A signature with a static batch of 2 (Keras' own export always makes the batch dynamic)."""
    model = _keras_dense()
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: {"probs": module.model(x)},
                               input_signature=[tf.TensorSpec([2, 6], tf.float32, name="features")])
    saved = tmp_path / "fixed-saved"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    result = convert(saved, ConvertOptions(out=tmp_path / "repo" / "fixed"))
    assert result.framework == "tensorflow"
    assert result.comparison is not None and result.comparison.max_abs_diff < 1e-5
    print(f"Keras dense (batch 2): ONNX vs TensorFlow max abs diff {result.comparison.max_abs_diff:.3g}")
    assert result.inputs == [{"name": "features", "dtype": "FP32", "shape": [2, 6]}]
    assert result.outputs == [{"name": "probs", "dtype": "FP32", "shape": [2, 3]}]


class TokenScorer(tf.Module):
    """Token ids [batch, seq] and features [batch, 3] → scores [batch, 4] and pooled [batch, 8]:
    an embedding lookup, a mean over the sequence and a dense layer, as a tf.function."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.emb = tf.Variable(rng.standard_normal((50, 8)).astype(np.float32))
        self.w = tf.Variable(rng.standard_normal((8, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int64, name="ids"),
                                  tf.TensorSpec([None, 3], tf.float32, name="extra")])
    def serve(self, ids: tf.Tensor, extra: tf.Tensor) -> dict[str, tf.Tensor]:
        pooled = tf.reduce_mean(tf.gather(self.emb, ids), axis=1)
        scores = tf.matmul(pooled, self.w) + tf.reduce_sum(extra, axis=1, keepdims=True)
        return {"scores": scores, "pooled": pooled}


def test_tf_function_with_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    module = TokenScorer()
    saved = tmp_path / "scorer-saved"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    out = tmp_path / "repo" / "scorer"
    res = runner.invoke(app, ["convert", str(saved), "--out", str(out), "--int-high", "50"])
    assert res.exit_code == 0, res.output
    diff = _diff(res.output)
    print(f"tf.function scorer (dynamic batch and sequence): ONNX vs TensorFlow max abs diff {diff:.3g}")
    assert diff < 1e-5
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert {t["name"]: (t["dtype"], t["shape"]) for t in spec["inputs"]} == {
        "ids": ("INT64", [-1, -1]), "extra": ("FP32", [-1, 3])}
    assert {t["name"]: (t["dtype"], t["shape"]) for t in spec["outputs"]} == {
        "scores": ("FP32", [-1, 4]), "pooled": ("FP32", [-1, 8])}
    rng = np.random.default_rng(4)
    with run_server(out.parent) as srv, InhouseClient(srv.url) as c:
        for batch, seq in ((1, 3), (4, 11)):
            ids = rng.integers(0, 50, (batch, seq))
            extra = rng.standard_normal((batch, 3)).astype(np.float32)
            got, _ = c.infer("scorer", {"ids": ids, "extra": extra})
            expected = module.serve(tf.constant(ids), tf.constant(extra))
            for name in ("scores", "pooled"):
                np.testing.assert_allclose(got[name], expected[name].numpy(), atol=1e-5)


def test_saved_models_it_cannot_convert(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    res = runner.invoke(app, ["convert", str(broken), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "[1007]" in res.output and "TensorFlow cannot load" in res.output
    module = TokenScorer()
    saved = tmp_path / "scorer"
    tf.saved_model.save(module, str(saved), signatures={"serving_default": module.serve})
    with pytest.raises(ConversionError, match=r"no signature 'predict'.*serving_default"):
        convert(saved, ConvertOptions(out=tmp_path / "m", signature="predict"))
    assert not (tmp_path / "m").exists()
