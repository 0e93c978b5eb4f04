"""KServe v2 over gRPC against a real server, with tritonclient's gRPC client (and, for typed
contents, tritonclient's own generated stubs on a plain grpc channel)."""

from __future__ import annotations

import json
import queue
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import yaml
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from conftest import RunningServer, run_server, wait_until
from gate_backend import GATES, Gate
from inhouse.protocols.proto import grpc_service_pb2 as ours


@pytest.fixture
def client(server: RunningServer) -> Any:
    c = tgrpc.InferenceServerClient(server.grpc_target)
    yield c
    c.close()


@pytest.fixture
def stub(server: RunningServer) -> Any:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


def _inputs(a: np.ndarray, b: np.ndarray) -> list[Any]:
    xa = tgrpc.InferInput("a", list(a.shape), "FP32")
    xa.set_data_from_numpy(a)
    xb = tgrpc.InferInput("b", list(b.shape), "FP32")
    xb.set_data_from_numpy(b)
    return [xa, xb]


def test_wire_compatible_with_published_proto() -> None:
    """Every message we declare has the same full name, field names, numbers and types as in
    tritonclient's generated descriptors of Triton's grpc_service.proto."""
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton = tpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == triton.full_name == "inference.GRPCInferenceService"
    checked = 0
    seen: set[str] = set()

    def compare(mine: Any, theirs: Any) -> None:
        nonlocal checked
        assert mine.full_name == theirs.full_name
        if mine.full_name in seen:
            return
        seen.add(mine.full_name)
        for f in mine.fields:
            t = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), f.full_name
            if f.enum_type is not None:  # same numbers for every value we declare
                assert {v.name: v.number for v in f.enum_type.values}.items() <= {
                    v.name: v.number for v in t.enum_type.values}.items(), f.full_name
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                compare(f.message_type, t.message_type)  # messages used by fields, e.g. model_config.proto's
            checked += 1
        for nested in mine.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name])

    for method in service.methods:
        other = triton.methods_by_name[method.name]
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)
        compare(method.input_type, other.input_type)
        compare(method.output_type, other.output_type)
    assert len(service.methods) == 12 and checked > 120


def test_health_metadata(client: Any, server: RunningServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "inhouse" and "model_repository" in meta.extensions
    assert client.is_model_ready("add") and client.is_model_ready("add", "1")
    assert not client.is_model_ready("add", "7")
    m = client.get_model_metadata("add", as_json=True)
    with server.client() as c:
        rest = c.get("/v2/models/add").json()
    assert m["versions"] == ["1"] and m["platform"] == rest["platform"] != ""
    assert m["inputs"] == [{"name": "a", "datatype": "FP32", "shape": ["-1", "4"]},
                           {"name": "b", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert m["outputs"][0]["name"] == "out"


def test_infer_raw(client: Any) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    r = client.infer("add", _inputs(a, a), request_id="r1", outputs=[tgrpc.InferRequestedOutput("out")])
    assert r.get_response().id == "r1" and r.get_response().model_version == "1"
    np.testing.assert_allclose(r.as_numpy("out"), a * 2)
    assert len(r.get_response().raw_output_contents) == 1


def test_infer_bytes_and_int64(client: Any) -> None:
    x = tgrpc.InferInput("x", [1, 3], "BYTES")
    x.set_data_from_numpy(np.array([["héllo".encode(), b"", b"z"]], dtype=object))
    r = client.infer("echo-str", [x])
    assert r.as_numpy("y").tolist() == [["héllo".encode(), b"", b"z"]]
    big = np.array([[2**62, -(2**62)]], dtype=np.int64)
    x = tgrpc.InferInput("x", [1, 2], "INT64")
    x.set_data_from_numpy(big)
    np.testing.assert_array_equal(client.infer("echo-i64", [x]).as_numpy("y"), big)


def test_infer_typed_contents(stub: Any) -> None:
    req = tpb.ModelInferRequest(model_name="add", id="t1")
    for name in ("a", "b"):
        t = req.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        t.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.5])
    resp = stub.ModelInfer(req)
    out = np.frombuffer(resp.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(out, [2, 4, 6, 9])
    # typed outputs on request
    req.parameters["binary_data_output"].bool_param = False
    resp = stub.ModelInfer(req)
    assert not resp.raw_output_contents
    assert list(resp.outputs[0].contents.fp32_contents) == [2, 4, 6, 9]
    # BYTES and INT64 typed
    req = tpb.ModelInferRequest(model_name="echo-str")
    req.inputs.add(name="x", datatype="BYTES", shape=[1, 2]).contents.bytes_contents.extend([b"a", b"bc"])
    req.parameters["binary_data_output"].bool_param = False
    assert list(stub.ModelInfer(req).outputs[0].contents.bytes_contents) == [b"a", b"bc"]
    req = tpb.ModelInferRequest(model_name="echo-i64")
    req.inputs.add(name="x", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([2**62, -5])
    resp = stub.ModelInfer(req)
    assert np.frombuffer(resp.raw_output_contents[0], np.int64).tolist() == [2**62, -5]


def test_priority_and_timeout_parameters(client: Any) -> None:
    a = np.ones((1, 4), np.float32)
    r = client.infer("add", _inputs(a, a), priority=1, timeout=5_000_000)  # µs, as Triton
    np.testing.assert_allclose(r.as_numpy("out"), a * 2)
    r = client.infer("add", _inputs(a, a), client_timeout=10)  # a gRPC deadline
    np.testing.assert_allclose(r.as_numpy("out"), a * 2)


def _gate_input(rid: float) -> list[Any]:
    x = tgrpc.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[rid, 0.0]], np.float32))
    return [x]


def test_priority_and_timeout_take_effect(tmp_path: Path) -> None:
    """Over gRPC, with a model the test holds busy: a priority-1 request overtakes queued
    priority-2 ones (tritonclient leaves out ``priority=0``, Triton's "default level"); a request
    whose Triton ``timeout`` or gRPC deadline passes in the queue gets DEADLINE_EXCEEDED and never
    runs."""
    repo = tmp_path / "models"
    (repo / "g" / "1").mkdir(parents=True)
    (repo / "g" / "model.yaml").write_text(yaml.safe_dump({"name": "g", "backend": "gate", "batching": {
        "max_batch_size": 2, "priority_levels": 3, "default_timeout_ms": 20000}}))
    GATES["g"] = gate = Gate()
    with run_server(repo) as srv:
        client = tgrpc.InferenceServerClient(srv.grpc_target)
        results: queue.Queue[tuple[float, Any]] = queue.Queue()
        scheduler: Any = srv.server.manager.resolve("g").scheduler

        def send(rid: float, **kw: Any) -> None:
            client.async_infer("g", _gate_input(rid), lambda result, error: results.put((rid, error)), **kw)

        try:
            gate.hold()
            send(0)
            assert gate.entered.acquire(timeout=10)
            for rid in (1, 2, 3, 4):
                send(rid, priority=2)
            wait_until(lambda: scheduler.queue_depth() == 4)
            send(9, priority=1)
            wait_until(lambda: scheduler.stats.submitted == 6)
            gate.open.set()
            done = dict(results.get(timeout=30) for _ in range(6))
            assert all(e is None for e in done.values()), done
            assert gate.executed_ids()[:2] == [0, 9]  # the priority-1 request jumped the queue

            gate.hold()  # and drops the permits the first round's batches left
            send(10)
            assert gate.entered.acquire(timeout=10)  # 10 is running: 7 and 8 can only queue
            with pytest.raises(InferenceServerException) as err:
                client.infer("g", _gate_input(7), timeout=150_000)  # µs, as Triton
            assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "3002" in err.value.message()
            with pytest.raises(InferenceServerException) as err:
                client.infer("g", _gate_input(8), client_timeout=0.3)  # a gRPC deadline
            assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
            wait_until(lambda: scheduler.queue_depth() == 0)  # both left the queue while the model was busy
            gate.open.set()
            assert results.get(timeout=30) == (10, None)
        finally:
            gate.open.set()
            client.close()
    assert 7 not in gate.executed_ids() and 8 not in gate.executed_ids()


def test_repository_index_load_unload(client: Any, server: RunningServer) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "add", "version": "1", "state": "READY"} in index
    client.unload_model("add")
    assert not client.is_model_ready("add")
    states = {m["name"]: m.get("state") for m in client.get_model_repository_index(as_json=True)["models"]}
    assert states["add"] == "UNLOADED"
    with pytest.raises(InferenceServerException) as err:
        client.infer("add", _inputs(np.ones((1, 4), np.float32), np.ones((1, 4), np.float32)))
    assert err.value.status() == "StatusCode.UNAVAILABLE" and "[1002]" in err.value.message()
    # load with a spec override (JSON merged over model.yaml), as REST's parameters.config
    client.load_model("add", config=json.dumps({"description": "loaded over gRPC"}))
    assert client.is_model_ready("add")
    with server.client() as c:
        assert c.get("/v2/models/add/config").json()["description"] == "loaded over gRPC"
    ready = client.get_model_repository_index(as_json=True)["models"]
    assert all(m.get("state") == "READY" for m in ready if m["name"] == "add")


def test_repository_ready_filter(stub: Any) -> None:
    stub.RepositoryModelUnload(tpb.RepositoryModelUnloadRequest(model_name="mlp"))
    names = {m.name for m in stub.RepositoryIndex(tpb.RepositoryIndexRequest(ready=True)).models}
    assert "mlp" not in names and "add" in names
    everything = {m.name for m in stub.RepositoryIndex(tpb.RepositoryIndexRequest()).models}
    assert "mlp" in everything


def test_stream_infer(client: Any) -> None:
    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        a = np.arange(4, dtype=np.float32).reshape(1, 4)
        for i in range(5):
            client.async_stream_infer("add", _inputs(a + i, a), request_id=str(i))
        client.async_stream_infer("nope", _inputs(a, a), request_id="bad")  # the stream survives it
        client.async_stream_infer("add", _inputs(a, a), request_id="after")
        got: dict[str, Any] = {}
        errors = []
        for _ in range(7):
            result, error = results.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("out")
    finally:
        client.stop_stream()
    assert sorted(got) == ["0", "1", "2", "3", "4", "after"]
    np.testing.assert_allclose(got["3"], a * 2 + 3)
    assert len(errors) == 1 and "[1002]" in str(errors[0]) and "nope" in str(errors[0])


def test_metadata_for_unknown_model_is_not_found(client: Any) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "[1002]" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_calls_show_in_metrics(client: Any, server: RunningServer) -> None:
    """The observability interceptor sits on the real gRPC front end (GrpcFrontEnd.interceptors)."""
    a = np.ones((1, 4), np.float32)
    client.infer("add", _inputs(a, a))
    with pytest.raises(InferenceServerException):
        client.infer("nope", _inputs(a, a))
    with server.client() as c:
        text = c.get("/metrics").text
    ok = [line for line in text.splitlines() if line.startswith("grpc_server_handled_total{")
          and 'grpc_method="ModelInfer"' in line and 'grpc_code="OK"' in line]
    missing = [line for line in text.splitlines() if line.startswith("grpc_server_handled_total{")
               and 'grpc_method="ModelInfer"' in line and 'grpc_code="NOT_FOUND"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    assert missing and float(missing[0].rsplit(" ", 1)[1]) >= 1


def test_model_config_in_triton_layout(client: Any, server: RunningServer) -> None:
    """tritonclient's get_model_config works over gRPC and REST, in Triton's layout: batch
    dimension implied when batching is on, TYPE_* names, dynamic batching and instances."""
    cfg = client.get_model_config("echo-str", as_json=True)["config"]
    assert cfg["name"] == "echo-str" and cfg["platform"] == "onnxruntime_onnx"
    assert "max_batch_size" not in cfg  # 0: no batching, full shape in dims (JSON leaves out zeros)
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_STRING", "dims": ["-1", "-1"]}]

    override = {"batching": {"max_batch_size": 8, "preferred_batch_sizes": [4, 8], "max_queue_delay_ms": 1.5,
                             "priority_levels": 2}, "instances": {"count": 2}}
    client.load_model("add", config=json.dumps(override))
    grpc_cfg = client.get_model_config("add").config  # the typed message, from tritonclient's own stubs
    assert grpc_cfg.max_batch_size == 8 and grpc_cfg.backend == "onnxruntime"
    assert [(i.name, i.data_type, list(i.dims)) for i in grpc_cfg.input] == [("a", 11, [4]), ("b", 11, [4])]
    assert grpc_cfg.output[0].name == "out" and list(grpc_cfg.output[0].dims) == [4]
    assert list(grpc_cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert grpc_cfg.dynamic_batching.max_queue_delay_microseconds == 1500
    assert grpc_cfg.dynamic_batching.priority_levels == 2
    assert grpc_cfg.instance_group[0].count == 2 and grpc_cfg.instance_group[0].kind == 2  # KIND_CPU
    assert not grpc_cfg.model_transaction_policy.decoupled
    with server.client() as c:
        rest = c.get("/v2/models/add/config").json()
    # REST carries the same Triton keys beside inhouse's own spec
    assert rest["max_batch_size"] == 8 and rest["input"][0] == {
        "name": "a", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [4], "optional": False}
    assert rest["batching"]["max_batch_size"] == 8 and rest["inputs"][0]["shape"] == [-1, 4]
    with pytest.raises(InferenceServerException, match="1002"):
        client.get_model_config("no-such-model")


def test_inference_statistics(client: Any, server: RunningServer) -> None:
    """tritonclient's get_inference_statistics over gRPC and REST: counts and durations of successes,
    failures, queue waits and backend calls, per batch size."""
    a = np.ones((2, 4), np.float32)
    for _ in range(2):
        client.infer("add", _inputs(a, a))
    with server.client() as c:  # REST requests count too
        body = {"inputs": [{"name": n, "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 8} for n in "ab"]}
        assert c.post("/v2/models/add/infer", json=body).status_code == 200
    with pytest.raises(InferenceServerException):
        client.infer("add", _inputs(np.ones((2, 5), np.float32), np.ones((2, 5), np.float32)))  # wrong shape
    stats = client.get_inference_statistics("add").model_stats
    assert len(stats) == 1 and stats[0].name == "add" and stats[0].version == "1"
    s = stats[0]
    inf = s.inference_stats
    assert inf.success.count == 3 and inf.success.ns > 0 and inf.fail.count == 1
    assert inf.queue.count == 3 and inf.compute_infer.count == 3 and inf.compute_infer.ns > 0
    assert s.inference_count == 3 and 1 <= s.execution_count <= 3 and s.last_inference > 0
    assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
    # perf_analyzer aborts when the three compute counts differ
    assert inf.compute_input.count == inf.compute_output.count == inf.compute_infer.count
    assert all(b.compute_input.count == b.compute_output.count == b.compute_infer.count for b in s.batch_stats)

    every = {m.name for m in client.get_inference_statistics().model_stats}
    assert every == {"add", "mlp", "echo-str", "echo-i64"}
    with server.client() as c:
        rest = c.get("/v2/models/add/stats").json()["model_stats"][0]
        assert rest["inference_stats"]["success"]["count"] == 3 and rest["execution_count"] == s.execution_count
        compute = ("compute_input", "compute_infer", "compute_output")
        assert {rest["inference_stats"][k]["count"] for k in compute} == {3}
        assert c.get("/v2/models/add/versions/1/stats").json()["model_stats"][0]["version"] == "1"
        assert {m["name"] for m in c.get("/v2/models/stats").json()["model_stats"]} == every
        r = c.get("/v2/models/no-such-model/stats")
        assert r.status_code == 404 and r.headers["inhouse-error-code"] == "1002"
    with pytest.raises(InferenceServerException, match="1002"):
        client.get_inference_statistics("add", "7")
