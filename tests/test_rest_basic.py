"""KServe v2 REST happy paths against a real server."""

from __future__ import annotations

import numpy as np

from conftest import RunningServer


def test_health_and_metadata(server: RunningServer) -> None:
    with server.client() as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2").json()
        assert meta["name"] == "inhouse" and "model_repository" in meta["extensions"]
        m = c.get("/v2/models/add").json()
        assert m["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 4]},
                               {"name": "b", "datatype": "FP32", "shape": [-1, 4]}]
        assert m["outputs"][0]["name"] == "out" and m["versions"] == ["1"]
        assert c.get("/v2/models/add/versions/1/ready").json() == {"name": "add", "ready": True}
        assert c.get("/health").json()["ready"] is True
        assert "/v2/models/{model}/infer" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200


def test_infer_json(server: RunningServer) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    with server.client() as c:
        r = c.post("/v2/models/add/infer", json={"id": "r1", "inputs": [
            {"name": "a", "shape": [2, 4], "datatype": "FP32", "data": a.ravel().tolist()},
            {"name": "b", "shape": [2, 4], "datatype": "FP32", "data": a.tolist()},  # nested is fine
        ]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "r1" and body["model_name"] == "add" and body["model_version"] == "1"
    out = body["outputs"][0]
    assert out["shape"] == [2, 4]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 4), a * 2)


def test_bytes_and_int64(server: RunningServer) -> None:
    with server.client() as c:
        r = c.post("/v2/models/echo-str/infer", json={"inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": ["héllo", "world"]}]})
        assert r.json()["outputs"][0]["data"] == ["héllo", "world"], r.text
        big = 2**62
        r = c.post("/v2/models/echo-i64/infer", json={"inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "INT64", "data": [big, -big]}]})
        assert r.json()["outputs"][0]["data"] == [big, -big]


def test_gzip_response(server: RunningServer) -> None:
    x = np.ones((300, 4), np.float32).ravel().tolist()
    with server.client() as c:
        r = c.post("/v2/models/add/infer", headers={"accept-encoding": "gzip"}, json={"inputs": [
            {"name": "a", "shape": [300, 4], "datatype": "FP32", "data": x},
            {"name": "b", "shape": [300, 4], "datatype": "FP32", "data": x}]})
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "gzip"
    assert r.json()["outputs"][0]["data"][:2] == [2.0, 2.0]
