"""The dynamic batcher in a real server: batched outputs equal unbatched ones, priorities,
back-pressure, deadlines, disconnects, instances and warm-up."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
import pytest
import yaml
from onnx import TensorProto, helper

from conftest import RunningServer, run_server, wait_until
from gate_backend import GATES, Gate
from models import _model, identity_model, mlp_model, write_model

BATCH = {"max_batch_size": 8, "max_queue_delay_ms": 5}


def _gate_model(repo: Path, name: str, **spec: Any) -> Gate:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "model.yaml").write_text(yaml.safe_dump({"name": name, "backend": "gate", **spec}))
    GATES[name] = gate = Gate()
    return gate


def _x(ids: list[float]) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [len(ids), 2], "data": [[i, 0.0] for i in ids]}


def _infer_body(ids: list[float], **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [_x(ids)]}
    if params:
        body["parameters"] = params
    return body


def _stats(srv: RunningServer, name: str) -> Any:
    return srv.server.manager.resolve(name).scheduler.stats  # type: ignore[union-attr]


def _masked_model() -> bytes:
    """seq = ids * mask (per token), pooled = sum(ids * mask) over the sequence — padding-proof."""
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["b", "t"])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", "t"])
    seq = helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["b", "t"])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["b"])
    axes = onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("Mul", ["ids", "mask"], ["seq"]),
             helper.make_node("ReduceSum", ["seq", "axes"], ["pooled"], keepdims=0)]
    return _model(helper.make_graph(nodes, "masked", [ids, mask], [seq, pooled], initializer=[axes]))


DTYPES = [(TensorProto.BOOL, "BOOL", np.bool_), (TensorProto.UINT8, "UINT8", np.uint8),
          (TensorProto.UINT16, "UINT16", np.uint16), (TensorProto.UINT32, "UINT32", np.uint32),
          (TensorProto.UINT64, "UINT64", np.uint64), (TensorProto.INT8, "INT8", np.int8),
          (TensorProto.INT16, "INT16", np.int16), (TensorProto.INT32, "INT32", np.int32),
          (TensorProto.INT64, "INT64", np.int64), (TensorProto.FLOAT16, "FP16", np.float16),
          (TensorProto.FLOAT, "FP32", np.float32), (TensorProto.DOUBLE, "FP64", np.float64),
          (TensorProto.STRING, "BYTES", object)]


@pytest.fixture(scope="module")
def batch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("batching") / "models"
    repo.mkdir()
    for onnx_type, v2, _ in DTYPES:
        write_model(repo, f"id-{v2.lower()}", identity_model(onnx_type), {"batching": BATCH})
    write_model(repo, "mlp", mlp_model())
    write_model(repo, "mlp-b", mlp_model(), {"batching": {**BATCH, "preferred_batch_sizes": [4, 8]},
                                             "instances": {"count": 2}, "warmup": {"samples": 2}})
    write_model(repo, "masked", _masked_model(), {"batching": BATCH, "inputs": [
        {"name": "ids", "dtype": "FP32", "shape": [-1, -1], "pad_value": 0},
        {"name": "mask", "dtype": "FP32", "shape": [-1, -1], "pad_value": 0}]})
    with run_server(repo) as srv:
        yield srv


async def _many(url: str, path: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def _random_tensor(rng: np.random.Generator, v2: str, np_type: Any, rows: int) -> np.ndarray:
    shape = (rows, 3)
    if v2 == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if v2 == "BYTES":
        return np.array([[f"r{rng.integers(1000)}-é" for _ in range(3)] for _ in range(rows)], dtype=object)
    if v2.startswith("FP"):
        return rng.standard_normal(shape).astype(np_type)
    info = np.iinfo(np_type)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(np_type)


@pytest.mark.parametrize(("v2", "np_type"), [(d[1], d[2]) for d in DTYPES], ids=[d[1] for d in DTYPES])
def test_batched_identity_equals_input_for_every_datatype(batch_server: RunningServer, v2: str,
                                                          np_type: Any) -> None:
    rng = np.random.default_rng(0)
    arrays = [_random_tensor(rng, v2, np_type, int(rng.integers(1, 4))) for _ in range(24)]
    bodies = [{"inputs": [{"name": "x", "datatype": v2, "shape": list(a.shape),
                           "data": [str(s) for s in a.ravel()] if v2 == "BYTES" else a.ravel().tolist()}]}
              for a in arrays]
    name = f"id-{v2.lower()}"
    before = _stats(batch_server, name).batches
    responses = asyncio.run(_many(batch_server.url, f"/v2/models/{name}/infer", bodies))
    for a, r in zip(arrays, responses, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == list(a.shape)
        got = np.array(out["data"], dtype=object if v2 == "BYTES" else np_type).reshape(a.shape)
        np.testing.assert_array_equal(got, a)
    assert _stats(batch_server, name).batches - before < len(bodies)  # requests did share batches


def test_batched_mlp_equals_unbatched(batch_server: RunningServer) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((int(rng.integers(1, 5)), 32)).astype(np.float32) for _ in range(48)]
    bodies = [{"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape),
                           "data": x.ravel().tolist()}]} for x in xs]
    single = asyncio.run(_many(batch_server.url, "/v2/models/mlp/infer", bodies))
    stats = _stats(batch_server, "mlp-b")
    before = stats.batches
    batched = asyncio.run(_many(batch_server.url, "/v2/models/mlp-b/infer", bodies))
    for a, b in zip(single, batched, strict=True):
        assert a.status_code == b.status_code == 200, b.text
        np.testing.assert_allclose(a.json()["outputs"][0]["data"], b.json()["outputs"][0]["data"],
                                   rtol=1e-5, atol=1e-6)
    assert stats.batches - before < len(bodies)
    assert stats.executed == stats.submitted  # nothing lost, nothing run twice
    # a microsecond model is measured as cheaper than a thread hand-off and runs on the loop
    assert _stats(batch_server, "mlp").inline_batches > 0


def test_padded_sequences_equal_unpadded(batch_server: RunningServer) -> None:
    rng = np.random.default_rng(2)
    cases = []
    for _ in range(24):
        rows, length = int(rng.integers(1, 3)), int(rng.integers(1, 9))
        ids = rng.integers(1, 50, (rows, length)).astype(np.float32)
        mask = np.ones_like(ids)
        cases.append((ids, mask))
    bodies = [{"inputs": [{"name": "ids", "datatype": "FP32", "shape": list(i.shape), "data": i.ravel().tolist()},
                          {"name": "mask", "datatype": "FP32", "shape": list(m.shape), "data": m.ravel().tolist()}]}
              for i, m in cases]
    stats = _stats(batch_server, "masked")
    before = stats.batches
    responses = asyncio.run(_many(batch_server.url, "/v2/models/masked/infer", bodies))
    for (ids, _), r in zip(cases, responses, strict=True):
        assert r.status_code == 200, r.text
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["seq"]["shape"] == list(ids.shape)
        np.testing.assert_allclose(np.array(outs["seq"]["data"]).reshape(ids.shape), ids)
        np.testing.assert_allclose(outs["pooled"]["data"], ids.sum(axis=1))
    assert stats.batches - before < len(bodies)


def test_request_larger_than_max_batch_is_chunked(batch_server: RunningServer) -> None:
    x = np.random.default_rng(3).standard_normal((21, 32)).astype(np.float32)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [21, 32], "data": x.ravel().tolist()}]}
    stats = _stats(batch_server, "mlp-b")
    before = stats.executed
    with batch_server.client() as c:
        one = c.post("/v2/models/mlp/infer", json=body).json()["outputs"][0]
        chunked = c.post("/v2/models/mlp-b/infer", json=body).json()["outputs"][0]
    assert chunked["shape"] == [21, 2]
    np.testing.assert_allclose(chunked["data"], one["data"], rtol=1e-5, atol=1e-6)
    assert stats.executed - before == 3  # 8 + 8 + 5 rows


def test_bad_priority_and_header_priority(batch_server: RunningServer) -> None:
    x = {"name": "features", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}
    with batch_server.client() as c:
        r = c.post("/v2/models/mlp-b/infer", json={"inputs": [x], "parameters": {"priority": -1}})
        assert r.status_code == 400 and r.headers["inhouse-error-code"] == "2001"
        assert "priority" in r.json()["error"]
        # beyond the model's levels: served at the lowest level, as Triton does
        r = c.post("/v2/models/mlp-b/infer", json={"inputs": [x], "parameters": {"priority": 5}})
        assert r.status_code == 200
        r = c.post("/v2/models/mlp-b/infer", json={"inputs": [x]}, headers={"Inhouse-Priority": "x"})
        assert r.status_code == 400 and r.headers["inhouse-error-code"] == "2001"
        r = c.post("/v2/models/mlp-b/infer", json={"inputs": [x]}, headers={"Inhouse-Priority": "0"})
        assert r.status_code == 200


def test_batching_needs_a_dynamic_batch_dimension(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    write_model(repo, "fixed", identity_model(shape=[1, 4]), {"batching": BATCH})
    with run_server(repo) as srv, srv.client() as c:
        idx = c.post("/v2/repository/index").json()
        entry = next(e for e in idx if e["name"] == "fixed")
        assert entry["state"] == "FAILED" and entry["code"] == 1005
        assert "dynamic first dimension" in entry["reason"]


# ---- overload, priorities, deadlines, disconnects: a gate model the test holds closed ------------
@pytest.fixture
def gate_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    repo.mkdir()
    return repo


class _Bg:
    """Requests sent from a background event loop, so the test can act while they wait."""

    def __init__(self, url: str) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = url
        self.client = httpx.AsyncClient(base_url=url, timeout=30)

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(self.client.post(path, json=body, headers=headers), self.loop)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_priority_zero_is_served_before_earlier_low_priority(gate_repo: Path) -> None:
    gate = _gate_model(gate_repo, "g-prio", batching={"max_batch_size": 2, "priority_levels": 2})
    with run_server(gate_repo) as srv:
        bg = _Bg(srv.url)
        try:
            gate.hold()
            blocker = bg.post("/v2/models/g-prio/infer", _infer_body([0]))
            assert gate.entered.acquire(timeout=10)
            stats = _stats(srv, "g-prio")
            low = [bg.post("/v2/models/g-prio/infer", _infer_body([i], priority=1)) for i in (1, 2, 3, 4)]
            wait_until(lambda: srv.server.manager.resolve("g-prio").scheduler.queue_depth() == 4)  # type: ignore
            high = bg.post("/v2/models/g-prio/infer", _infer_body([9], priority=0))
            wait_until(lambda: stats.submitted == 6)
            gate.open.set()
            for f in [blocker, *low, high]:
                assert f.result(10).status_code == 200
        finally:
            bg.close()
    order = gate.executed_ids()
    assert order[0] == 0 and order[1] == 9, order  # the priority-0 request jumped the queue
    assert sorted(order) == [0, 1, 2, 3, 4, 9]


def test_full_queue_answers_429_at_once_and_loses_nothing(gate_repo: Path) -> None:
    gate = _gate_model(gate_repo, "g-full", batching={"max_batch_size": 4, "max_queue_size": 3})
    with run_server(gate_repo) as srv:
        bg = _Bg(srv.url)
        try:
            gate.hold()
            blocker = bg.post("/v2/models/g-full/infer", _infer_body([0]))
            assert gate.entered.acquire(timeout=10)
            queued = [bg.post("/v2/models/g-full/infer", _infer_body([i])) for i in (1, 2, 3)]
            wait_until(lambda: srv.server.manager.resolve("g-full").scheduler.queue_depth() == 3)  # type: ignore
            with srv.client() as c:
                t0 = time.perf_counter()
                r = c.post("/v2/models/g-full/infer", json=_infer_body([4]))
                took = time.perf_counter() - t0
                assert r.status_code == 429 and r.headers["inhouse-error-code"] == "3001"
                assert int(r.headers["retry-after"]) >= 1 and "max_queue_size" in r.json()["error"]
                assert took < 2.0  # at once: no waiting for the queue to move
                assert c.get("/v2/health/ready").status_code == 200  # the server stays responsive
            gate.open.set()
            assert [f.result(10).status_code for f in [blocker, *queued]] == [200] * 4
        finally:
            bg.close()
    ids = gate.executed_ids()
    assert sorted(ids) == [0, 1, 2, 3]  # every admitted request ran exactly once; the rejected never


def test_deadline_returns_504_and_the_request_never_runs(gate_repo: Path) -> None:
    gate = _gate_model(gate_repo, "g-late", batching={"max_batch_size": 4, "default_timeout_ms": 20000})
    with run_server(gate_repo) as srv:
        bg = _Bg(srv.url)
        try:
            gate.hold()
            blocker = bg.post("/v2/models/g-late/infer", _infer_body([0]))
            assert gate.entered.acquire(timeout=10)
            with srv.client() as c:
                t0 = time.perf_counter()
                r = c.post("/v2/models/g-late/infer", json=_infer_body([7], timeout_ms=150))
                took = time.perf_counter() - t0
            assert r.status_code == 504 and r.headers["inhouse-error-code"] == "3002", r.text
            assert 0.1 < took < 5
            gate.open.set()
            assert blocker.result(10).status_code == 200
            with srv.client() as c:  # and the model keeps serving
                assert c.post("/v2/models/g-late/infer", json=_infer_body([8])).status_code == 200
            stats = _stats(srv, "g-late")
            assert stats.expired == 1
        finally:
            bg.close()
    assert 7 not in gate.executed_ids()


def test_client_disconnect_cancels_queued_work(gate_repo: Path) -> None:
    gate = _gate_model(gate_repo, "g-gone", batching={"max_batch_size": 4})
    with run_server(gate_repo) as srv:
        bg = _Bg(srv.url)
        try:
            gate.hold()
            blocker = bg.post("/v2/models/g-gone/infer", _infer_body([0]))
            assert gate.entered.acquire(timeout=10)
            body = orjson.dumps(_infer_body([5]))
            host, port = srv.url.removeprefix("http://").split(":")
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v2/models/g-gone/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            stats = _stats(srv, "g-gone")
            wait_until(lambda: stats.submitted == 2)
            sock.close()
            wait_until(lambda: stats.cancelled == 1)
            gate.open.set()
            assert blocker.result(10).status_code == 200
        finally:
            bg.close()
    assert gate.executed_ids() == [0]


def test_failing_call_is_isolated_to_its_requests(gate_repo: Path) -> None:
    _gate_model(gate_repo, "g-fail", batching={"max_batch_size": 4}, instances={"count": 2})
    with run_server(gate_repo) as srv, srv.client() as c:
        # NaN is not JSON; send it as binary tensor data
        raw = np.array([[1.0, np.nan]], np.float32).tobytes()
        header = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                           "parameters": {"binary_data_size": len(raw)}}]})
        r = c.post("/v2/models/g-fail/infer", content=header + raw,
                   headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 500 and r.headers["inhouse-error-code"] == "2010", r.text
        assert "RuntimeError" in r.json()["error"]
        responses = asyncio.run(_many(srv.url, "/v2/models/g-fail/infer", [_infer_body([i]) for i in range(8)]))
        assert all(x.status_code == 200 for x in responses)


def test_warmup_runs_before_ready_and_reads_npz(gate_repo: Path) -> None:
    gate = _gate_model(gate_repo, "g-warm", warmup={"samples": 3})
    gate_npz = _gate_model(gate_repo, "g-npz", warmup={"file": "warm.npz", "samples": 2})
    np.savez(gate_repo / "g-npz" / "warm.npz", x=np.array([[42.0, 1.0]], np.float32))
    _gate_model(gate_repo, "g-badnpz", warmup={"file": "warm.npz"})
    np.savez(gate_repo / "g-badnpz" / "warm.npz", y=np.zeros((1, 2), np.float32))
    with run_server(gate_repo) as srv, srv.client() as c:
        assert len(gate.calls) == 3
        assert gate_npz.executed_ids() == [42.0, 42.0]
        entry = next(e for e in c.post("/v2/repository/index").json() if e["name"] == "g-badnpz")
        assert entry["state"] == "FAILED" and entry["code"] == 1005 and "missing: ['x']" in entry["reason"]
