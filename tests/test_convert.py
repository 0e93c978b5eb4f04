"""inhouse convert: real PyTorch / scikit-learn / LightGBM / XGBoost models converted to ONNX,
checked against the original, then served and called over v2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.client import InhouseClient
from inhouse.errors import ConversionError, MissingExtraError, ModelFormatError
from inhouse.tools.convert import ConvertOptions, convert
from inhouse.tools.extras import require
from inhouse.tools.onnx_info import choose_opset, max_runtime_opset
from inhouse.tools.samples import parse_example_input

torch = pytest.importorskip("torch")
runner = CliRunner()


class TinyClassifier(torch.nn.Module):
    """Token ids [batch, seq] → logits [batch, 3]: embedding, mean over the sequence, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(dim=1))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x) * scale
        return y, y.sum(dim=1)


def _spec(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "model.yaml").read_text())


def test_torchscript_converts_serves_and_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    src = tmp_path / "classifier.pt"
    torch.jit.script(model).save(str(src))
    out = tmp_path / "repo" / "classifier"
    res = runner.invoke(app, ["convert", str(src), "--example-input", "ids=1x12:int64", "--out", str(out),
                              "--output-names", "logits"])
    assert res.exit_code == 0, res.output
    assert "verified against pytorch: max abs diff" in res.output
    spec = _spec(out)
    assert spec["inputs"] == [{"name": "ids", "dtype": "INT64", "shape": [-1, -1]}]  # batch and sequence dynamic
    assert spec["outputs"] == [{"name": "logits", "dtype": "FP32", "shape": [-1, 3]}]
    assert "1/model.onnx" in spec["files"]["sha256"]
    ids = np.random.default_rng(3).integers(0, 50, (5, 7))  # a batch and length never traced
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).numpy()
    with run_server(out.parent) as srv, InhouseClient(srv.url) as c:
        got, _ = c.infer("classifier", {"ids": ids})
    np.testing.assert_allclose(got["logits"], expected, atol=1e-5)


def test_pickled_module_with_dynamo_exporter_two_inputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = tmp_path / "two.pt"
    torch.save(TwoInputs().eval(), str(src))
    out = tmp_path / "repo" / "two"
    result = convert(src, ConvertOptions(out=out, example_inputs=["x=2x8", "scale=2x1"]))
    assert result.framework == "pytorch" and result.opset >= 18
    assert [t["name"] for t in result.inputs] == ["x", "scale"]
    assert [t["name"] for t in result.outputs] == ["output_0", "output_1"]
    assert result.comparison is not None and result.comparison.max_abs_diff < 1e-4
    # converting again adds version 2 and keeps the spec in step
    again = convert(src, ConvertOptions(out=out, example_inputs=["x=2x8", "scale=2x1"], exporter="legacy",
                                        opset=17))
    assert again.version == 2 and set(_spec(out)["files"]["sha256"]) == {"1/model.onnx", "2/model.onnx"}


def test_state_dict_is_refused_with_advice(tmp_path: Path) -> None:
    src = tmp_path / "weights.pt"
    torch.save(TinyClassifier().state_dict(), str(src))
    res = runner.invoke(app, ["convert", str(src), "--example-input", "shape=1x8:int64", "--out",
                              str(tmp_path / "m")])
    assert res.exit_code == 1
    assert "[1007]" in res.output and "state_dict" in res.output and "torch.save(model" in res.output
    assert not (tmp_path / "m").exists()


def test_torch_without_example_input_or_with_a_bad_one(tmp_path: Path) -> None:
    src = tmp_path / "c.pt"
    torch.jit.script(TinyClassifier()).save(str(src))
    with pytest.raises(ConversionError, match="--example-input"):
        convert(src, ConvertOptions(out=tmp_path / "m"))
    with pytest.raises(ConversionError, match="not understood"):
        convert(src, ConvertOptions(out=tmp_path / "m", example_inputs=["1by8"]))
    with pytest.raises(ConversionError, match="fails on the example inputs"):
        convert(src, ConvertOptions(out=tmp_path / "m", example_inputs=["shape=2x8:float32"]))


def test_sklearn_pipeline_with_string_labels_round_trip(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    iris = load_iris()
    y = np.asarray(iris.target_names)[iris.target]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(iris.data, y)
    src = tmp_path / "iris.pkl"
    joblib.dump(clf, src)
    out = tmp_path / "repo" / "iris-clf"
    res = runner.invoke(app, ["convert", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "labels agree on 100.0%" in res.output
    spec = _spec(out)
    assert spec["task"] == "classification" and spec["labels"] == ["setosa", "versicolor", "virginica"]
    assert [o["name"] for o in spec["outputs"]] == ["label", "probabilities"]
    x = iris.data[::25].astype(np.float32)
    with run_server(out.parent) as srv, InhouseClient(srv.url) as c:
        got, _ = c.infer("iris-clf", {"features": x})
    assert [v.decode() for v in got["label"]] == list(clf.predict(x))
    np.testing.assert_allclose(got["probabilities"], clf.predict_proba(x), atol=1e-5)


@pytest.mark.parametrize("family", ["lightgbm", "xgboost"])
def test_gradient_boosting_libraries(tmp_path: Path, family: str) -> None:
    pytest.importorskip(family)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12))
    y = (x[:, 0] + x[:, 3] > 0).astype(int)
    if family == "lightgbm":
        import lightgbm

        model = lightgbm.LGBMClassifier(n_estimators=20, verbose=-1).fit(x, y)
    else:
        import xgboost

        model = xgboost.XGBClassifier(n_estimators=20, max_depth=3).fit(x, y)
    src = tmp_path / f"{family}.joblib"
    joblib.dump(model, src)
    result = convert(src, ConvertOptions(out=tmp_path / family, features=12))
    assert result.framework == family
    assert result.comparison is not None and result.comparison.max_abs_diff < 1e-4
    assert result.outputs[0] == {"name": "label", "dtype": "INT64", "shape": [-1]}
    with pytest.raises(ConversionError, match="disagrees"):
        convert(src, ConvertOptions(out=tmp_path / "x", features=5))


def test_regressor_reports_difference_and_samples_file(tmp_path: Path) -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 6))
    src = tmp_path / "ridge.pkl"
    joblib.dump(Ridge().fit(x, x @ np.arange(6)), src)
    samples = tmp_path / "s.npz"
    np.savez(samples, features=x[:10].astype(np.float32))
    res = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "ridge"), "--samples", str(samples)])
    assert res.exit_code == 0, res.output
    assert "variable: max abs diff" in res.output
    assert _spec(tmp_path / "ridge")["outputs"] == [{"name": "variable", "dtype": "FP32", "shape": [-1, 1]}]


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nope.pt", ConvertOptions(out=tmp_path / "m"))
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"\0")
    with pytest.raises(ModelFormatError, match="cannot tell the framework"):
        convert(odd, ConvertOptions(out=tmp_path / "m"))
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a pickle")
    res = runner.invoke(app, ["convert", str(junk), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "[1007]" in res.output and "cannot be read" in res.output
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelFormatError, match="neither a Hugging Face"):
        convert(tmp_path / "folder", ConvertOptions(out=tmp_path / "m"))


def test_cli_gives_coded_errors_for_what_it_cannot_convert(tmp_path: Path) -> None:
    """Every refusal is one 'error: [code] message' line and exit status 1, never a traceback."""
    (tmp_path / "empty").mkdir()
    keras = tmp_path / "model.h5"
    keras.write_bytes(b"\x89HDF")
    onnx_junk = tmp_path / "junk.onnx"
    onnx_junk.write_bytes(b"not a graph")
    src = tmp_path / "c.pt"
    torch.jit.script(TinyClassifier()).save(str(src))
    out_file = tmp_path / "taken"
    out_file.write_text("a file, not a folder")
    cases = [
        ([str(tmp_path / "empty")], "[1001]", "neither a Hugging Face model"),
        ([str(keras)], "[1001]", "model.export('dir')"),
        ([str(onnx_junk)], "[1001]", "does not load in onnxruntime"),
        ([str(tmp_path / "missing.pkl")], "[1007]", "does not exist"),
        ([str(src), "--example-input", "ids=1x4:int64", "--opset", "99"], "[1001]", "newer than the installed"),
    ]
    for args, code, text in cases:
        res = runner.invoke(app, ["convert", *args, "--out", str(tmp_path / "repo" / "m")])
        assert res.exit_code == 1, (args, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.exception)
        assert code in res.output and text in res.output, (args, res.output)
    res = runner.invoke(app, ["convert", str(src), "--example-input", "ids=1x4:int64", "--out", str(out_file)])
    assert res.exit_code == 1 and "[1007]" in res.output and "is a file" in res.output
    assert not (tmp_path / "repo").exists()


def test_opset_is_checked_against_onnxruntime() -> None:
    limit = max_runtime_opset()
    assert limit >= 17
    assert choose_opset(None) == min(18, limit)
    with pytest.raises(ModelFormatError, match="newer than the installed onnxruntime"):
        choose_opset(limit + 1)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed here")
def test_missing_tensorflow_names_the_extra(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    res = runner.invoke(app, ["convert", str(saved), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1
    assert "[1008]" in res.output and "pip install 'inhouse[convert-tf]'" in res.output


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed here")
def test_missing_transformers_names_the_extra(tmp_path: Path) -> None:
    hf = tmp_path / "bert"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MissingExtraError, match=r"inhouse\[convert-hf\]"):
        convert(hf, ConvertOptions(out=tmp_path / "m"))


def test_require_names_package_and_extra() -> None:
    with pytest.raises(MissingExtraError) as info:
        require("surely_not_installed_pkg.sub", "convert-torch")
    assert "surely_not_installed_pkg" in info.value.message and "inhouse[convert-torch]" in info.value.message
    assert info.value.code == 1008


def test_example_input_grammar() -> None:
    e = parse_example_input("shape=1x128:int64")
    assert e.name is None and e.shape == (1, 128) and np.dtype(e.dtype) == np.int64
    e = parse_example_input("pixels=1x3x32x32")
    assert e.name == "pixels" and np.dtype(e.dtype) == np.float32
    with pytest.raises(ConversionError, match="unknown dtype"):
        parse_example_input("x=1x2:complex")
    with pytest.raises(ConversionError, match="at least 1"):
        parse_example_input("x=0x2")
