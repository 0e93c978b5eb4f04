"""The HTTP/2 front of the gRPC port (``grpc.front: fast``, the default), on real servers with real
clients: ModelInfer answered by the front, every other RPC forwarded to grpc.aio behind it (health,
reflection, server streams), the client's address reaching security only through the front,
mutual TLS, broken HTTP/2 from a client, and a graceful stop with a call in flight."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from certs import make_pki
from conftest import RunningServer, run_server, wait_until
from gate_backend import GATES, Gate
from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.security.audit import AuditLog
from inhouse.security.keys import KeyStore

SPOOF = (("x-inhouse-front-peer", "10.6.6.6"), ("x-inhouse-front-secret", "guess"))


def _mlp_request(model: str = "mlp") -> Any:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="features", datatype="FP32", shape=[1, 32])
    req.raw_input_contents.append(np.ones((1, 32), np.float32).tobytes())
    return req


def _inner_socket(srv: RunningServer) -> str:
    front = srv.server._grpc  # the test looks at where the inner server listens
    assert front is not None and front.inner_socket is not None
    return front.inner_socket


def test_front_answers_infer_and_forwards_the_rest(server: RunningServer) -> None:
    target = server.grpc_target
    assert target is not None
    inner = _inner_socket(server)
    assert stat.S_IMODE(os.stat(os.path.dirname(inner)).st_mode) == 0o700  # the inner socket's folder is private
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        out = stub.ModelInfer(_mlp_request())  # the front's own path
        assert list(out.outputs[0].shape) == [1, 2] and len(out.raw_output_contents[0]) == 8
        gz = stub.ModelInfer(_mlp_request(), compression=grpc.Compression.Gzip)  # grpc-encoding: gzip
        assert gz.raw_output_contents == out.raw_output_contents
        assert stub.ServerLive(pb.ServerLiveRequest()).live  # forwarded unary
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp")).inputs[0].name == "features"
        with pytest.raises(grpc.RpcError) as err:  # a forwarded error keeps its status and details
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # ModelInfer errors render as grpc.aio's did
            stub.ModelInfer(_mlp_request("nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(err.value.trailing_metadata())["inhouse-error-code"]  # type: ignore[attr-defined]

        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest())  # a server stream, forwarded
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)  # a bidirectional stream, forwarded
        answers = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(answers).list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names

        # many calls of both kinds at once on one connection: beyond what the front's and the
        # inner link's connections hold before they first count their open streams exactly
        futures = [stub.ModelInfer.future(_mlp_request()) if i % 2 else stub.ServerReady.future(
            pb.ServerReadyRequest()) for i in range(600)]
        answers = [f.result(timeout=60) for f in futures]
        assert all(a.raw_output_contents == out.raw_output_contents for a in answers[1::2])
        assert all(a.ready for a in answers[::2])


def test_client_address_comes_from_the_front_only(tmp_path: Path, repo: Path) -> None:
    """A client that sends the front's own metadata names cannot choose the address security sees
    (nor can a caller on the inner socket without the process's secret)."""
    data = tmp_path / "data"
    key = KeyStore(data).create("app", ["infer"])[0]
    auth = (("authorization", f"Bearer {key}"),)
    with run_server(repo, data_dir=data, audit=True) as srv:
        assert srv.grpc_target is not None
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(_mlp_request(), metadata=auth + SPOOF)  # the front's path
            stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), metadata=auth + SPOOF)  # forwarded
        with grpc.insecure_channel(f"unix:{_inner_socket(srv)}") as ch:
            pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name="mlp"),
                                                               metadata=auth + SPOOF)
    log = AuditLog(data)
    rows = [r for r in log.entries() if r["transport"] == "grpc"]
    log.close()
    by_action = {r["action"]: r for r in rows}
    assert by_action["infer"]["client_ip"] == "127.0.0.1"
    metadata = [r for r in rows if r["action"] == "model.metadata"]
    assert [r["client_ip"] for r in metadata] == ["127.0.0.1", None]
    assert not any(r["client_ip"] == "10.6.6.6" for r in rows)


def test_mutual_tls_through_the_front(tmp_path: Path, repo: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    data = tmp_path / "data"
    with run_server(repo, data_dir=data, audit=True, tls_cert=pki.server.cert, tls_key=pki.server.key,
                    tls_client_ca=pki.ca.cert) as srv:
        ca = pki.ca.cert.read_bytes()

        def channel(pair: Any) -> grpc.Channel:
            creds = grpc.ssl_channel_credentials(ca, pair.key.read_bytes() if pair else None,
                                                 pair.cert.read_bytes() if pair else None)
            return grpc.secure_channel(f"localhost:{srv.grpc_port}", creds)

        with channel(pki.client) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ModelInfer(_mlp_request()).model_name == "mlp"
            assert stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp")).name == "mlp"
        for pair in (None, pki.stranger):  # no client certificate, or one the CA did not sign
            with channel(pair) as ch, pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_mlp_request(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    log = AuditLog(data)
    rows = [r for r in log.entries() if r["transport"] == "grpc"]
    log.close()
    assert {r["action"] for r in rows} >= {"infer", "model.metadata"}
    assert all(r["client_ip"] == "127.0.0.1" for r in rows)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _exchange(port: int, data: bytes) -> bytes:
    """Sends ``data`` on a fresh connection and returns what came back until the server closed
    it (a server that keeps it open fails the test by the socket's timeout)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
    return got


def test_broken_http2_gets_goaway_and_the_server_goes_on(server: RunningServer) -> None:
    port = server.grpc_port
    assert port is not None
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
    cases = [
        preface + _frame(1, 4, 1, os.urandom(64)),  # a HEADERS block that is not HPACK
        preface + _frame(0, 1, 0, b"data on stream 0"),  # DATA on the connection's stream
        preface + _frame(4, 0, 0, b"\x00\x04\xff\xff\xff\xff"),  # a window beyond 2^31-1
        preface + _frame(1, 4, 2, b"\x82"),  # a client may not open even-numbered streams
    ]
    for data in cases:
        answer = _exchange(port, data)
        assert b"\x07\x00\x00\x00\x00\x00" in answer  # a GOAWAY frame (type 7, stream 0) before the close
    assert b"\x07\x00" not in _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not HTTP/2: closed
    with grpc.insecure_channel(server.grpc_target or "") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:  # bytes that are not a ModelInferRequest
            ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\x0a\xff\xff\xff\x0f", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2001" in err.value.details()
        assert stub.ModelInfer(_mlp_request()).model_name == "mlp"


def test_stop_sends_goaway_and_finishes_the_call_in_flight(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "g" / "1").mkdir(parents=True)
    (repo / "g" / "model.yaml").write_text(yaml.safe_dump({"name": "g", "backend": "gate"}))
    GATES["g"] = gate = Gate()
    gate.hold()
    req = pb.ModelInferRequest(model_name="g")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(np.array([[7, 1]], np.float32).tobytes())
    server = run_server(repo)
    srv = server.__enter__()
    target = srv.grpc_target
    assert target is not None
    with grpc.insecure_channel(target) as ch:
        call = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer.future(req, timeout=30)
        assert gate.entered.acquire(timeout=10)
        idle = socket.create_connection(("127.0.0.1", srv.grpc_port or 0), timeout=10)  # a second, idle one
        idle.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        assert idle.recv(65536)  # the server's SETTINGS: the connection is the front's
        stopping = threading.Thread(target=lambda: server.__exit__(None, None, None))  # the server's stop
        stopping.start()
        # the port stops taking connections while the call in flight is still being answered
        wait_until(lambda: _refused(srv.grpc_port or 0))
        assert not call.done()
        got = b""
        with idle, contextlib.suppress(ConnectionResetError):
            while chunk := idle.recv(65536):  # the idle connection: a GOAWAY, then closed
                got += chunk
        assert b"\x07\x00\x00\x00\x00\x00" in got
        gate.open.set()
        answer = call.result(timeout=30)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [14.0, 2.0]
        stopping.join(30)
        assert not stopping.is_alive()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    time.sleep(0.05)
    return False


def test_a_concurrency_limit_counts_modelinfer_too(server_factory: Any, repo: Path) -> None:
    """With ``max_concurrent_rpcs`` set every RPC goes through grpc.aio's limit, ModelInfer included."""
    with server_factory(repo, grpc={"max_concurrent_rpcs": 1}) as srv, grpc.insecure_channel(srv.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        release = threading.Event()

        def held() -> Any:
            yield _mlp_request()
            release.wait(30)

        stream = stub.ModelStreamInfer(held())
        assert not next(stream).error_message  # the one RPC allowed is open
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_mlp_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "3004" in err.value.details()
        release.set()
        list(stream)


def test_messages_larger_than_the_windows(server: RunningServer) -> None:
    """Answers and forwarded messages of several MiB go through HTTP/2 flow control on both sides
    (grpcio's windows start at 64 KiB)."""
    values = np.arange(600_000, dtype=np.int64).reshape(1, -1)  # 4.8 MB each way
    req = pb.ModelInferRequest(model_name="echo-i64")
    req.inputs.add(name="x", datatype="INT64", shape=list(values.shape))
    req.raw_input_contents.append(values.tobytes())
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(server.grpc_target or "", options=opts) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        futures = [stub.ModelInfer.future(req, timeout=60) for _ in range(4)]  # the front's path
        for f in futures:
            assert np.frombuffer(f.result().raw_output_contents[0], np.int64).tolist() == values.ravel().tolist()
        answers = list(stub.ModelStreamInfer(iter([req, req]), timeout=60))  # forwarded
        assert len(answers) == 2 and not answers[0].error_message
        got = np.frombuffer(answers[1].infer_response.raw_output_contents[0], np.int64)
        assert got.tolist() == values.ravel().tolist()


def test_a_client_that_stops_answering_pings_is_dropped(server_factory: Any, repo: Path) -> None:
    with server_factory(repo, grpc={"keepalive_time_s": 0.3, "keepalive_timeout_s": 0.3}) as srv:
        start = time.monotonic()
        got = _exchange(srv.grpc_port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        assert b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" in got  # a PING (8 bytes, type 6, stream 0)
        assert time.monotonic() - start < 4  # then the silent connection is closed


def test_a_call_the_client_cancels_is_audited(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "g2" / "1").mkdir(parents=True)
    (repo / "g2" / "model.yaml").write_text(yaml.safe_dump({"name": "g2", "backend": "gate"}))
    GATES["g2"] = gate = Gate()
    gate.hold()
    req = pb.ModelInferRequest(model_name="g2")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(np.array([[1, 2]], np.float32).tobytes())
    data = tmp_path / "data"
    try:
        with run_server(repo, data_dir=data, audit=True) as srv, grpc.insecure_channel(srv.grpc_target or "") as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            running = stub.ModelInfer.future(req, timeout=30)
            assert gate.entered.acquire(timeout=10)
            queued = stub.ModelInfer.future(req, timeout=30)
            scheduler: Any = srv.server.manager.resolve("g2").scheduler
            wait_until(lambda: scheduler.queue_depth() == 1)
            queued.cancel()
            wait_until(lambda: scheduler.queue_depth() == 0)
            gate.open.set()
            assert running.result(timeout=30).model_name == "g2"
    finally:
        gate.open.set()
    log = AuditLog(data)
    rows = [(r["status"], r["code"]) for r in log.entries() if r["action"] == "infer"]
    log.close()
    assert sorted(rows, key=str) == sorted([(200, None), (499, 3003)], key=str)


def test_answers_wait_for_a_client_that_holds_its_windows(server: RunningServer) -> None:
    """An HTTP/2 client (h2, which raises FlowControlError on a byte past a window) that holds its
    windows: with a 16-byte stream window the answer stops at 16 bytes; with large stream windows
    and nothing acknowledged, 1,500 answers stop at the connection's 64 KiB. All of them complete,
    whole, once the client acknowledges what it got."""
    message = _mlp_request().SerializeToString()
    body = struct.pack(">BI", 0, len(message)) + message
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16})
    client.initiate_connection()
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
               (b":authority", b"localhost"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    data: dict[int, bytearray] = {}
    unacked: dict[int, int] = {}
    status: dict[int, bytes] = {}
    with socket.create_connection(("127.0.0.1", server.grpc_port or 0), timeout=30) as s:

        def pump(ack: bool, wait_s: float = 30) -> bool:
            """Reads once (up to ``wait_s``); False when nothing came."""
            s.sendall(client.data_to_send())
            s.settimeout(wait_s)
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                return False
            for event in client.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived):
                    data.setdefault(event.stream_id, bytearray()).extend(event.data)
                    unacked[event.stream_id] = unacked.get(event.stream_id, 0) + event.flow_controlled_length
                elif isinstance(event, h2.events.TrailersReceived):
                    status[event.stream_id] = dict(event.headers)[b"grpc-status"]
            if ack:
                ack_all()
            s.sendall(client.data_to_send())
            return True

        def ack_all() -> None:
            for sid, size in unacked.items():
                if size:
                    client.acknowledge_received_data(size, sid)
            unacked.clear()

        def call() -> int:
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, headers)
            client.send_data(sid, body, end_stream=True)
            return sid

        first = call()
        while pump(ack=False, wait_s=0.5):
            pass
        assert len(data[first]) == 16 and first not in status  # the answer waits at the stream's window

        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        ack_all()  # opens the first stream and the connection by its 16 bytes
        sids = [first]
        while len(sids) < 1500:  # nothing acknowledged from here
            sids.append(call())
            while client.open_outbound_streams >= 256 and pump(ack=False, wait_s=0.5):
                pass
            if client.open_outbound_streams >= 256:
                break  # stalled
        while pump(ack=False, wait_s=0.5):
            pass
        got = sum(len(d) for d in data.values())
        assert 65535 - 64 < got - 16 <= 65535  # the connection window, filled and not passed
        assert len(status) < len(sids)
        ack_all()
        while len(sids) < 1500:
            sids.append(call())
            while client.open_outbound_streams >= 256:
                pump(ack=True)
        while len(status) < len(sids):
            pump(ack=True)
    assert set(status.values()) == {b"0"}
    for sid in sids:
        answer = pb.ModelInferResponse.FromString(bytes(data[sid][5:]))
        assert answer.model_name == "mlp" and len(answer.raw_output_contents[0]) == 8
