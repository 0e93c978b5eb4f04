"""ONNX models whose weights live beside the graph (external data, as every model over 2 GB does):
served from plaintext and from encrypted files, checksums verified, escaping locations refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from models import mlp_model, write_model

FEATURES = 32


def _external_repo(tmp_path: Path, checksum: bool = False, location: str = "weights.bin") -> Path:
    repo = tmp_path / "models"
    mdir = write_model(repo, "mlp", mlp_model(features=FEATURES, seed=3))
    graph = onnx.load_model_from_string((mdir / "1/model.onnx").read_bytes())
    onnx.save_model(graph, str(mdir / "1/model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    if location != "weights.bin":  # rewrite the graph's pointer to the weights
        g = onnx.load(str(mdir / "1/model.onnx"), load_external_data=False)
        for t in g.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        (mdir / "1/model.onnx").write_bytes(g.SerializeToString())
    if checksum:
        doc = yaml.safe_load((mdir / "model.yaml").read_text())
        doc["files"] = {"sha256": {f"1/{f}": hashlib.sha256((mdir / "1" / f).read_bytes()).hexdigest()
                                   for f in ("model.onnx", "weights.bin")}}
        (mdir / "model.yaml").write_text(yaml.safe_dump(doc))
    return repo


def _expected(x: np.ndarray, tmp_path: Path) -> np.ndarray:
    import onnxruntime as ort

    ref = ort.InferenceSession(mlp_model(features=FEATURES, seed=3))
    name = ref.get_outputs()[0].name
    return ref.run([name], {ref.get_inputs()[0].name: x})[0]


def _infer(srv: object, x: np.ndarray) -> tuple[int, dict]:  # type: ignore[type-arg]
    body = {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with srv.client() as c:  # type: ignore[attr-defined]
        r = c.post("/v2/models/mlp/infer", json=body)
        return r.status_code, r.json()


def _index(srv: object) -> dict:  # type: ignore[type-arg]
    with srv.client() as c:  # type: ignore[attr-defined]
        return {e["name"]: e for e in c.post("/v2/repository/index").json()}


def test_external_data_is_served_and_checksummed(tmp_path: Path) -> None:
    repo = _external_repo(tmp_path, checksum=True)
    assert (repo / "mlp/1/weights.bin").stat().st_size > 4 * FEATURES * 64  # the weights really are outside
    x = np.random.default_rng(0).standard_normal((3, FEATURES)).astype(np.float32)
    with run_server(repo) as srv:
        status, doc = _infer(srv, x)
        assert status == 200, doc
        out = next(o for o in doc["outputs"] if o["datatype"] == "FP32")
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), _expected(x, tmp_path), rtol=1e-5)

    # one flipped byte in the weights file: 1004 and nothing loaded
    weights = repo / "mlp/1/weights.bin"
    raw = bytearray(weights.read_bytes())
    raw[7] ^= 0x01
    weights.write_bytes(bytes(raw))
    with run_server(repo) as srv:
        entry = _index(srv)["mlp"]
        assert entry["state"] == "FAILED" and entry.get("code") == 1004 and "weights.bin" in entry["reason"]


def test_missing_or_escaping_external_data_is_a_clear_error(tmp_path: Path) -> None:
    repo = _external_repo(tmp_path / "a")
    (repo / "mlp/1/weights.bin").unlink()
    with run_server(repo) as srv:
        entry = _index(srv)["mlp"]
        assert entry["state"] == "FAILED" and entry.get("code") == 1005 and "weights.bin" in entry["reason"]

    (tmp_path / "b" / "secret.bin").parent.mkdir(parents=True)
    (tmp_path / "b" / "secret.bin").write_bytes(b"\0" * 16384)
    repo = _external_repo(tmp_path / "b", location="../../../secret.bin")
    with run_server(repo) as srv:
        entry = _index(srv)["mlp"]
        assert entry["state"] == "FAILED" and entry.get("code") == 1001 and "only files inside" in entry["reason"]


def test_encrypted_external_data_is_decrypted_in_memory(tmp_path: Path) -> None:
    repo = _external_repo(tmp_path)
    key = tmp_path / "model.key"
    res = CliRunner().invoke(app, ["encrypt", str(repo / "mlp"), "--key-file", str(key), "--new-key"])
    assert res.exit_code == 0 and "2 encrypted" in res.output, res.output
    x = np.ones((2, FEATURES), np.float32)
    with run_server(repo, model_key_file=key) as srv:
        status, doc = _infer(srv, x)
        assert status == 200, doc
        out = next(o for o in doc["outputs"] if o["datatype"] == "FP32")
        np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), _expected(x, tmp_path), rtol=1e-5)
    assert sorted(p.name for p in (repo / "mlp/1").iterdir()) == ["model.onnx", "weights.bin"]  # no plaintext

    raw = bytearray((repo / "mlp/1/weights.bin").read_bytes())
    raw[-3] ^= 0x01
    (repo / "mlp/1/weights.bin").write_bytes(bytes(raw))
    with run_server(repo, model_key_file=key) as srv:
        entry = _index(srv)["mlp"]
        assert entry["state"] == "FAILED" and entry.get("code") == 1004
