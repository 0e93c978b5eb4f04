"""Bad input over gRPC: clear status, our code in the details and trailing metadata, and the
server stays up. Also health checking, reflection and the concurrency limit, with grpcio."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from conftest import RunningServer, run_server
from gate_backend import GATES, Gate
from inhouse.server import StartupError
from models import add_model, write_model


def _code(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get("inhouse-error-code")


@pytest.fixture
def channel(server: RunningServer) -> Any:
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> Any:
    return tpb_grpc.GRPCInferenceServiceStub(channel)


def _add_request(model: str = "add", n: int = 1) -> Any:
    req = tpb.ModelInferRequest(model_name=model)
    for name in ("a", "b"):
        req.inputs.add(name=name, datatype="FP32", shape=[n, 4])
        req.raw_input_contents.append(np.ones((n, 4), np.float32).tobytes())
    return req


def _fails(call: Any, status: grpc.StatusCode, code: str, *words: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == status, err.details()
    assert _code(err) == code and err.details().startswith(f"[{code}] "), err.details()
    for w in words:
        assert w in err.details()
    rich = rpc_status.from_call(err)  # the standard rich error model carries the code too
    assert rich is not None and rich.message == err.details()
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info) and info.domain == "inhouse" and info.metadata["code"] == code
    return err


def test_bad_requests(stub: Any) -> None:
    _fails(lambda: stub.ModelInfer(_add_request("nope")), grpc.StatusCode.NOT_FOUND, "1002", "nope")
    # wrong typed contents field for the datatype
    req = tpb.ModelInferRequest(model_name="add")
    for name in ("a", "b"):
        req.inputs.add(name=name, datatype="FP32", shape=[1, 4]).contents.int_contents.extend([1, 2, 3, 4])
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2006", "fp32_contents", "int_contents")
    # raw contents whose byte length does not match shape × datatype
    req = _add_request()
    req.raw_input_contents[1] = b"\x00" * 12
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2005", "12 bytes", "16 bytes")
    # typed element count does not match the shape
    req = tpb.ModelInferRequest(model_name="add")
    for name in ("a", "b"):
        req.inputs.add(name=name, datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend([1.0] * 4)
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2005", "needs 8")
    # raw entries ≠ inputs, raw and typed mixed
    req = _add_request()
    del req.raw_input_contents[1]
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2001", "one raw entry per input")
    req = _add_request()
    req.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2001", "one or the other")
    # datatype that does not match the model, unknown datatype, unknown input, bad version
    req = _add_request()
    req.inputs[0].datatype = "FP64"
    req.raw_input_contents[0] = np.ones((1, 4), np.float64).tobytes()
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2006", "must be FP32")
    req.inputs[0].datatype = "FLOAT"
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2006", "not a KServe v2 datatype")
    req = _add_request()
    req.inputs[1].name = "c"
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2002", "'c'")
    req = _add_request()
    req.model_version = "x1"
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2001", "positive integer")
    req = _add_request()
    req.parameters["priority"].string_param = "high"
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2001", "priority")
    _fails(lambda: stub.ModelInfer(tpb.ModelInferRequest(model_name="add")),
           grpc.StatusCode.INVALID_ARGUMENT, "2001", "no inputs")
    # FP16 has no typed contents
    req = tpb.ModelInferRequest(model_name="add")
    req.inputs.add(name="a", datatype="FP16", shape=[1, 1]).contents.fp32_contents.append(1.0)
    _fails(lambda: stub.ModelInfer(req), grpc.StatusCode.INVALID_ARGUMENT, "2006", "raw_input_contents")
    # repository: unknown model, bad load parameters, unknown repository
    _fails(lambda: stub.RepositoryModelLoad(tpb.RepositoryModelLoadRequest(model_name="nope")),
           grpc.StatusCode.NOT_FOUND, "1002")
    load = tpb.RepositoryModelLoadRequest(model_name="add")
    load.parameters["config"].string_param = "{not json"
    _fails(lambda: stub.RepositoryModelLoad(load), grpc.StatusCode.INVALID_ARGUMENT, "2001", "not valid JSON")
    load = tpb.RepositoryModelLoadRequest(model_name="add")
    load.parameters["config"].string_param = '{"batching": {"max_batch_sise": 4}}'
    _fails(lambda: stub.RepositoryModelLoad(load), grpc.StatusCode.INVALID_ARGUMENT, "1005", "max_batch_sise")
    load = tpb.RepositoryModelLoadRequest(model_name="add")
    load.parameters["file:1/model.onnx"].bytes_param = b"xx"
    _fails(lambda: stub.RepositoryModelLoad(load), grpc.StatusCode.INVALID_ARGUMENT, "2001", "file:1/model.onnx")
    _fails(lambda: stub.RepositoryIndex(tpb.RepositoryIndexRequest(repository_name="other")),
           grpc.StatusCode.INVALID_ARGUMENT, "2001", "other")
    _fails(lambda: stub.RepositoryModelUnload(tpb.RepositoryModelUnloadRequest(model_name="../etc")),
           grpc.StatusCode.NOT_FOUND, "1002")
    # after all of that, the server still serves (and the failed reload kept 'add' serving)
    resp = stub.ModelInfer(_add_request())
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [2.0] * 4


def test_oversized_message(server_factory: Any, repo: Path) -> None:
    with server_factory(repo, grpc={"max_message_bytes": 64 * 1024}) as srv, \
            grpc.insecure_channel(srv.grpc_target) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        big = _add_request(n=8192)  # 2 × 128 KiB
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(big)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.ModelInfer(_add_request(n=2)).raw_output_contents


def test_stream_errors_and_half_close(stub: Any) -> None:
    good, bad = _add_request(), _add_request()
    good.id, bad.id = "g", "b"
    bad.raw_input_contents[0] = b"123"
    responses = list(stub.ModelStreamInfer(iter([bad, good, good])))  # the iterator ends: a half-close
    assert len(responses) == 3
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].error_message.startswith("[2005] ") and errors[0].infer_response.id == "b"
    assert sorted(r.infer_response.id for r in responses if not r.error_message) == ["g", "g"]


def test_client_disconnects_mid_call(tmp_path: Path) -> None:
    # A model the test holds closed, so the calls are surely in flight when the client leaves.
    root = tmp_path / "models"
    (root / "held" / "1").mkdir(parents=True)
    (root / "held" / "model.yaml").write_text("name: held\nbackend: gate\n")
    GATES["held"] = gate = Gate()
    write_model(root, "add", add_model())
    gate.hold()
    try:
        with run_server(root, grpc={"max_concurrent_rpcs": 2}) as srv, grpc.insecure_channel(srv.grpc_target) as ch:
            stub = tpb_grpc.GRPCInferenceServiceStub(ch)
            held = tpb.ModelInferRequest(model_name="held")
            held.inputs.add(name="x", datatype="FP32", shape=[1, 2])
            held.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
            # a unary call whose client gives up, and a stream cancelled with requests in flight
            futures = [stub.ModelInfer.future(held) for _ in range(2)]
            assert gate.entered.acquire(timeout=10)
            for f in futures:
                f.cancel()
            for f in futures:
                assert f.cancelled() or f.code() == grpc.StatusCode.CANCELLED
            stream = stub.ModelStreamInfer(iter([held, held]))
            time.sleep(0.3)
            stream.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.CANCELLED
            gate.open.set()
            # the server is up, and the cancelled calls no longer count against the limit of 2
            deadline = time.monotonic() + 30
            while True:
                try:
                    stub.ModelInfer(_add_request(), timeout=30)
                    stub.ModelInfer(_add_request(), timeout=30)
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    finally:
        gate.open.set()


def test_concurrency_limit(server_factory: Any, repo: Path) -> None:
    with server_factory(repo, grpc={"max_concurrent_rpcs": 2}) as srv, grpc.insecure_channel(srv.grpc_target) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        gates = [threading.Event(), threading.Event()]

        def held(gate: threading.Event) -> Any:
            yield _add_request()
            gate.wait(30)

        streams = [stub.ModelStreamInfer(held(g)) for g in gates]
        for s in streams:
            assert not next(s).error_message  # both streams are open: the limit is reached
        err = _fails(lambda: stub.ServerLive(tpb.ServerLiveRequest()), grpc.StatusCode.RESOURCE_EXHAUSTED, "3004",
                     "max_concurrent_rpcs")
        assert dict(err.trailing_metadata())["retry-after"] == "1"
        retry = error_details_pb2.RetryInfo()
        assert rpc_status.from_call(err).details[1].Unpack(retry) and retry.retry_delay.seconds == 1
        # health checks are never refused
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        for g, s in zip(gates, streams, strict=True):
            g.set()
            assert list(s) == []
        assert stub.ServerLive(tpb.ServerLiveRequest()).live


def test_health_checking(server: RunningServer, channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "inference.GRPCInferenceService", "add"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == serving
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service="add"), timeout=60)
    assert next(watch).status == serving
    stub = tpb_grpc.GRPCInferenceServiceStub(channel)
    stub.RepositoryModelUnload(tpb.RepositoryModelUnloadRequest(model_name="add"))
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="add")).status == \
        health_pb2.HealthCheckResponse.NOT_SERVING
    stub.RepositoryModelLoad(tpb.RepositoryModelLoadRequest(model_name="add"))
    assert next(watch).status == serving
    watch.cancel()


def test_reflection(channel: grpc.Channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    svc = pool.FindServiceByName("inference.GRPCInferenceService")
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"} <= set(svc.methods_by_name)
    infer = svc.methods_by_name["ModelInfer"].input_type
    assert infer.fields_by_name["raw_input_contents"].number == 7
    assert pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest").fields_by_name["service"].number == 1


def test_grpc_port_in_use_fails_at_start(repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError) as err, run_server(repo, grpc_port=port, load="none"):
            pass
    assert f"Cannot listen for gRPC on 127.0.0.1:{port}" in str(err.value) and "--grpc-port" in str(err.value)


def test_grpc_can_be_turned_off(repo: Path) -> None:
    with run_server(repo, grpc={"enabled": False}, load="none") as srv:
        assert srv.grpc_target is None and srv.grpc_port is None
        with srv.client() as c:
            assert c.get("/v2/health/live").status_code == 200


def test_stream_burst_beyond_window(stub: Any) -> None:
    """More requests than the stream's in-flight window (64): all answered, once each."""
    def burst() -> Any:
        for i in range(300):
            req = _add_request()
            req.id = str(i)
            yield req

    ids = [r.infer_response.id for r in stub.ModelStreamInfer(burst(), timeout=120) if not r.error_message]
    assert sorted(ids, key=int) == [str(i) for i in range(300)]


def test_undecodable_messages_are_invalid_argument(stub: Any, channel: grpc.Channel) -> None:
    # bytes no protobuf decoder accepts (a length-delimited field cut short): grpcio alone
    # answers UNKNOWN for unary calls and INTERNAL for streams
    garbage = b"\x0a\xff\xff\x01xx"
    ident: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    for method in ("/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ServerLive",
                   "/grpc.health.v1.Health/Check"):
        _fails(lambda m=method: channel.unary_unary(m, **ident)(garbage, timeout=10),
               grpc.StatusCode.INVALID_ARGUMENT, "2001", "not a valid protobuf message", method)
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", **ident)
    _fails(lambda: list(stream(iter([_add_request().SerializeToString(), garbage]), timeout=10)),
           grpc.StatusCode.INVALID_ARGUMENT, "2001", "not a valid protobuf message")
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", **ident)
    _fails(lambda: list(watch(garbage, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT, "2001")
    resp = stub.ModelInfer(_add_request())  # and the server still serves
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
