"""Model folders as users write them: bare folders, model_spec.yaml, specs filled from the graph."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import run_server
from models import add_model, mlp_model, write_model


def test_bare_folder_and_model_spec_yaml(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "bare" / "1").mkdir(parents=True)
    (repo / "bare" / "1" / "model.onnx").write_bytes(mlp_model())  # no model.yaml at all
    (repo / "alt" / "1").mkdir(parents=True)
    (repo / "alt" / "1" / "model.onnx").write_bytes(add_model(scale=2.0))
    (repo / "alt" / "model_spec.yaml").write_text(yaml.safe_dump({"name": "alt", "description": "alt spec"}))
    (repo / ".hidden" / "1").mkdir(parents=True)  # ignored: not a model
    (repo / "notes").mkdir()                      # ignored: no spec, no version folders
    with run_server(repo) as srv, srv.client() as c:
        names = sorted(e["name"] for e in c.post("/v2/repository/index").json())
        assert names == ["alt", "bare"]
        meta = c.get("/v2/models/bare").json()
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}]
        assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
        assert c.get("/v2/models/alt/config").json()["description"] == "alt spec"
        r = c.post("/v2/models/alt/infer", json={"inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]})
        assert r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]


def test_spec_name_must_match_folder(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "one", add_model(), {"name": "two"})
    write_model(repo, "mlp", mlp_model())
    with run_server(repo) as srv, srv.client() as c:
        entry = next(e for e in c.post("/v2/repository/index").json() if e["name"] == "one")
        assert entry["state"] == "FAILED" and entry["code"] == 1005
        assert "name 'two' differs from its folder 'one'" in entry["reason"]
        assert c.get("/v2/models/mlp/ready").status_code == 200
