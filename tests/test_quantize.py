"""inhouse quantize: INT8 and FP16 versions of real ONNX models, checked and served."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.client import InhouseClient
from inhouse.errors import ConversionError, ModelFormatError
from inhouse.tools.convert import ConvertOptions, convert
from inhouse.tools.onnx_info import versions_in as versions
from inhouse.tools.quantize import quantize
from models import mlp_model, write_model

runner = CliRunner()


def test_int8_with_check_writes_next_version_and_serves(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    mdir = write_model(repo, "mlp", mlp_model(features=32, hidden=256, classes=4), checksum=True)
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    np.savez(tmp_path / "samples.npz", features=x)
    res = runner.invoke(app, ["quantize", str(mdir), "--int8", "--check", str(tmp_path / "samples.npz")])
    assert res.exit_code == 0, res.output
    assert "version 2, INT8 of version 1" in res.output
    assert "probabilities: max abs diff" in res.output and "top-1 agreement" in res.output
    assert "speed on this machine:" in res.output and "x)" in res.output
    spec = yaml.safe_load((mdir / "model.yaml").read_text())
    assert set(spec["files"]["sha256"]) == {"1/model.onnx", "2/model.onnx"}  # checksum kept for the new version
    import onnx

    ops = {n.op_type for n in onnx.load(str(mdir / "2" / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    with run_server(repo) as srv, InhouseClient(srv.url) as c:
        got, header = c.infer("mlp", {"features": x[:8]})
    assert header["model_version"] == "2"
    assert got["probabilities"].shape == (8, 4)
    np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, atol=1e-4)


def test_fp16_keeps_fp32_interface_for_ml_operators(tmp_path: Path) -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5))
    src = tmp_path / "ridge.pkl"
    ridge = Ridge().fit(x, x.sum(axis=1))
    joblib.dump(ridge, src)
    repo = tmp_path / "models"
    convert(src, ConvertOptions(out=repo / "ridge"))
    np.savez(tmp_path / "s.npz", features=x.astype(np.float32))
    r = quantize(repo / "ridge", "fp16", check=tmp_path / "s.npz", tolerance=0.05)
    assert r.version == 2 and r.comparison is not None and r.comparison.max_abs_diff < 0.05
    assert r.latency_before_s and r.latency_after_s
    with run_server(repo) as srv, InhouseClient(srv.url) as c:  # the spec's FP32 output still holds
        got, header = c.infer("ridge", {"features": x[:3].astype(np.float32)})
    assert header["model_version"] == "2" and got["variable"].dtype == np.float32
    np.testing.assert_allclose(got["variable"].ravel(), ridge.predict(x[:3]), atol=0.02)


def test_tolerance_refuses_to_write(tmp_path: Path) -> None:
    mdir = write_model(tmp_path / "models", "mlp", mlp_model())
    np.savez(tmp_path / "s.npz", features=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    with pytest.raises(ConversionError, match="outside the tolerance"):
        quantize(mdir, "int8", check=tmp_path / "s.npz", tolerance=0.0)
    assert not (mdir / "2").exists()


def test_bad_quantize_requests(tmp_path: Path) -> None:
    res = runner.invoke(app, ["quantize", str(tmp_path / "missing"), "--int8"])
    assert res.exit_code == 1 and "[1007]" in res.output and "not a model folder" in res.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no version folders"):
        quantize(tmp_path / "empty", "int8")
    mdir = write_model(tmp_path / "models", "mlp", mlp_model())
    with pytest.raises(ConversionError, match="no version 7"):
        quantize(mdir, "int8", version=7)
    np.savez(tmp_path / "wrong.npz", other=np.zeros((2, 32), np.float32))
    with pytest.raises(ConversionError, match="needs inputs"):
        quantize(mdir, "int8", check=tmp_path / "wrong.npz")
    (mdir / "1" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelFormatError, match="not a readable ONNX model"):
        quantize(mdir, "fp16")
    res = runner.invoke(app, ["quantize", str(mdir), "--int8", "--fp16"])
    assert res.exit_code == 2 and "choose one" in res.output


def test_int8_of_a_converted_logistic_regression_says_there_is_nothing_to_quantize(tmp_path: Path) -> None:
    """convert → quantize on a scikit-learn linear model: its one LinearClassifier (ai.onnx.ml)
    has no weights INT8 covers, so quantize says so, exits 0 and writes nothing."""
    import onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 30))
    joblib.dump(LogisticRegression().fit(x, x[:, 0] > 0), tmp_path / "lr.pkl")
    mdir = tmp_path / "models" / "lr"
    res = runner.invoke(app, ["convert", str(tmp_path / "lr.pkl"), "--out", str(mdir), "--features", "30"])
    assert res.exit_code == 0, res.output
    opsets = [o.domain for o in onnx.load(str(mdir / "1" / "model.onnx")).opset_import]
    assert sorted(opsets) == ["", "ai.onnx.ml"]  # one import per domain
    res = runner.invoke(app, ["quantize", str(mdir), "--int8"])
    assert res.exit_code == 0, res.output
    assert "nothing to quantize" in res.output and "LinearClassifier (ai.onnx.ml)" in res.output
    assert "No version was written" in res.output and "wrote" not in res.output
    assert versions(mdir) == [1]


def test_int8_of_a_graph_that_imports_its_opset_twice(tmp_path: Path) -> None:
    """A model listing the default domain twice (what skl2onnx wrote for ai.onnx.ml-only graphs,
    and onnxruntime serves) is quantized, not refused with the quantizer's internal message."""
    import onnx

    model = onnx.load_from_string(mlp_model(features=32, hidden=256, classes=4))
    model.opset_import.append(onnx.helper.make_opsetid("", model.opset_import[0].version))
    mdir = write_model(tmp_path / "models", "mlp", model.SerializeToString())
    r = quantize(mdir, "int8")
    assert r.note is None and r.version == 2 and r.size_after < r.size_before
    ops = {n.op_type for n in onnx.load(str(mdir / "2" / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    with run_server(tmp_path / "models") as srv, InhouseClient(srv.url) as c:
        got, header = c.infer("mlp", {"features": np.ones((2, 32), np.float32)})
    assert header["model_version"] == "2" and got["probabilities"].shape == (2, 4)
