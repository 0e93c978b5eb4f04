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


def test_onnxruntime_session_options_are_applied(tmp_path: Path) -> None:
    import onnxruntime as ort

    repo = tmp_path / "models"
    write_model(repo, "tuned", mlp_model(), {"onnxruntime": {
        "providers": [{"name": "cpu", "options": {}}], "intra_op_threads": 1, "inter_op_threads": 2,
        "graph_optimization_level": "basic", "execution_mode": "parallel"}})
    write_model(repo, "plain", mlp_model())
    with run_server(repo) as srv, srv.client() as c:
        session = srv.server.manager.resolve("tuned").model.session  # type: ignore[union-attr]
        opts = session.get_session_options()
        assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 2
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert opts.execution_mode == ort.ExecutionMode.ORT_PARALLEL
        assert session.get_providers() == ["CPUExecutionProvider"]
        plain = srv.server.manager.resolve("plain").model.session.get_session_options()  # type: ignore[union-attr]
        assert plain.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        r = c.post("/v2/models/tuned/infer", json={"inputs": [
            {"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.0] * 32}]})
        assert r.json()["outputs"][0]["data"] == [0.5, 0.5]
