"""KServe v2 REST details seen with a plain HTTP client: response compression threshold,
binary_data_output, requested outputs, FP16 JSON, version routes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto

from conftest import run_server
from models import add_model, identity_model, write_model


def _add_body(n: int) -> dict[str, object]:
    x = [1.0] * (n * 4)
    return {"inputs": [{"name": "a", "shape": [n, 4], "datatype": "FP32", "data": x},
                       {"name": "b", "shape": [n, 4], "datatype": "FP32", "data": x}]}


def test_gzip_threshold_is_configurable(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    with run_server(repo, gzip_min_bytes=2000) as srv, srv.client(headers={"accept-encoding": "gzip"}) as c:
        small = c.post("/v2/models/add/infer", json=_add_body(2))     # ~150 bytes: sent as is
        large = c.post("/v2/models/add/infer", json=_add_body(200))   # ~3 KB: compressed
        assert "content-encoding" not in small.headers
        assert large.headers.get("content-encoding") == "gzip"
        assert large.json()["outputs"][0]["data"][:2] == [2.0, 2.0]
    with run_server(repo, gzip_min_bytes=0) as srv, srv.client(headers={"accept-encoding": "gzip"}) as c:
        assert "content-encoding" not in c.post("/v2/models/add/infer", json=_add_body(2000)).headers


def test_binary_outputs_and_fp16_json(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model(), version=1)
    write_model(repo, "add", add_model(scale=2.0), {"versions": {"policy": "all"}}, version=2)
    write_model(repo, "echo-fp16", identity_model(TensorProto.FLOAT16))
    with run_server(repo) as srv, srv.client() as c:
        body = {**_add_body(1), "parameters": {"binary_data_output": True}}
        r = c.post("/v2/models/add/versions/1/infer", json=body)
        n = int(r.headers["inference-header-content-length"])
        assert r.headers["content-type"] == "application/octet-stream"
        header = r.content[:n]
        assert b'"binary_data_size":16' in header and b'"model_version":"1"' in header
        np.testing.assert_array_equal(np.frombuffer(r.content[n:], np.float32), [2.0] * 4)
        # a per-output choice beats the request-wide one
        body["outputs"] = [{"name": "out", "parameters": {"binary_data": False}}]
        r = c.post("/v2/models/add/versions/2/infer", json=body)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["outputs"][0]["data"] == [4.0] * 4 and r.json()["model_version"] == "2"
        assert c.get("/v2/models/add/versions/2").json()["versions"] == ["2"]
        assert c.get("/v2/models/add").json()["versions"] == ["2", "1"]
        r = c.post("/v2/models/echo-fp16/infer", json={"inputs": [
            {"name": "x", "shape": [1, 3], "datatype": "FP16", "data": [0.5, -2.0, 1024.0]}]})
        out = r.json()["outputs"][0]
        assert out["datatype"] == "FP16" and out["data"] == [0.5, -2.0, 1024.0]
