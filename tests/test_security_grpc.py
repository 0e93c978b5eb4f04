"""The gRPC security interceptor on a real grpc.aio server with real channels. The service
behind it is a stand-in speaking the KServe v2 method names with a trivial wire format (the
inhouse gRPC front end plugs the same interceptor in)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest

from inhouse.security.audit import AuditLog
from inhouse.security.gate import Call, SecurityGate
from inhouse.security.keys import KeyStore
from inhouse.settings import load_settings
from inhouse.transports.grpc.security import SecurityInterceptor, declared_rpcs, guard_for, peer_address

SVC = "inference.GRPCInferenceService"


def _req(raw: bytes) -> Any:
    return SimpleNamespace(model_name=raw.decode())


def _resp(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else str(obj).encode()


async def _infer(request: Any, context: grpc.aio.ServicerContext) -> str:
    return f"ok:{request.model_name}"


async def _stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[str]:
    async for r in requests:
        yield f"ok:{r.model_name}"


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SVC, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(_infer, _req, _resp),
        "ServerLive": grpc.unary_unary_rpc_method_handler(_infer, _req, _resp),
        "RepositoryModelLoad": grpc.unary_unary_rpc_method_handler(_infer, _req, _resp),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(_stream, _req, _resp),
    })


@pytest.fixture
async def grpc_target(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, str], Path]]:
    data = tmp_path / "data"
    store = KeyStore(data)
    keys = {
        "infer": store.create("app", ["infer"], models=["add"])[0],
        "admin": store.create("ops", ["admin"])[0],
        "expired": store.create("old", ["infer"], expires_at=time.time() - 1)[0],
        "revoked": store.create("gone", ["infer"])[0],
        "other_ip": store.create("far", ["infer"], allow_ips=["10.0.0.0/8"])[0],
    }
    store.revoke("gone")
    store.close()
    gate = SecurityGate(load_settings(None, auth=True, data_dir=data))
    server = grpc.aio.server(interceptors=[SecurityInterceptor(gate)])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", keys, data
    finally:
        await server.stop(None)
        gate.close()


async def _call(target: str, method: str, model: str, key: str | None, header: str = "authorization") -> str:
    md = [] if key is None else [(header, f"Bearer {key}" if header == "authorization" else key)]
    async with grpc.aio.insecure_channel(target) as ch:
        fn = ch.unary_unary(f"/{SVC}/{method}", request_serializer=str.encode,
                            response_deserializer=lambda b: b.decode())
        return str(await fn(model, metadata=md))


async def test_grpc_auth_matrix(grpc_target: tuple[str, dict[str, str], Path]) -> None:
    target, k, data = grpc_target
    assert await _call(target, "ServerLive", "", None) == "ok:"  # liveness stays open
    cases = [
        (None, grpc.StatusCode.UNAUTHENTICATED, "4001"),
        ("ih_0123456789abcdef_nope", grpc.StatusCode.UNAUTHENTICATED, "4001"),
        (k["revoked"], grpc.StatusCode.UNAUTHENTICATED, "4001"),
        (k["expired"], grpc.StatusCode.UNAUTHENTICATED, "4001"),
        (k["admin"], grpc.StatusCode.PERMISSION_DENIED, "4003"),
        (k["other_ip"], grpc.StatusCode.PERMISSION_DENIED, "4003"),
    ]
    for key, status, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await _call(target, "ModelInfer", "add", key)
        assert ei.value.code() == status, key
        assert dict(ei.value.trailing_metadata() or ())["inhouse-error-code"] == code
    assert await _call(target, "ModelInfer", "add", k["infer"]) == "ok:add"
    assert await _call(target, "ModelInfer", "add", k["infer"], header="x-api-key") == "ok:add"
    with pytest.raises(grpc.aio.AioRpcError) as ei:  # wrong model for this key
        await _call(target, "ModelInfer", "mlp", k["infer"])
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED and "mlp" in (ei.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as ei:  # infer keys may not load models
        await _call(target, "RepositoryModelLoad", "add", k["infer"])
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await _call(target, "RepositoryModelLoad", "add", k["admin"]) == "ok:add"

    # streaming: every message's model is checked
    async with grpc.aio.insecure_channel(target) as ch:
        fn = ch.stream_stream(f"/{SVC}/ModelStreamInfer", request_serializer=str.encode,
                              response_deserializer=lambda b: b.decode())
        got = [m async for m in fn(iter(["add", "add"]), metadata=[("authorization", f"Bearer {k['infer']}")])]
        assert got == ["ok:add", "ok:add"]
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            _ = [m async for m in fn(iter(["add", "mlp"]), metadata=[("authorization", f"Bearer {k['infer']}")])]
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            _ = [m async for m in fn(iter(["add"]))]
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED

    log = AuditLog(data)
    rows = list(log.entries())
    assert log.verify().ok
    log.close()
    assert all(r["transport"] == "grpc" for r in rows) and not any(r["action"] == "health.live" for r in rows)
    assert [(r["status"], r["code"]) for r in rows[:6]] == [(401, 4001)] * 4 + [(403, 4003)] * 2
    assert rows[6]["status"] == 200 and rows[6]["model"] == "add" and rows[6]["client_ip"] == "127.0.0.1"


def test_classify_and_peer() -> None:
    rpcs = declared_rpcs()

    def classify_grpc(method: str) -> tuple[str, str, str | None]:
        guard = guard_for(method, rpcs)
        return guard.action, guard.scope, guard.model

    assert classify_grpc(f"/{SVC}/ServerLive")[1] == "open"
    assert classify_grpc(f"/{SVC}/RepositoryModelUnload")[1] == "admin"
    assert classify_grpc(f"/{SVC}/ModelMetadata") == ("model.metadata", "infer", "name")
    assert classify_grpc("/grpc.health.v1.Health/Check")[1] == "readiness"  # open unless open_readiness is off
    assert classify_grpc("/grpc.reflection.v1alpha.ServerReflection/X")[1] == "any"
    assert classify_grpc(f"/{SVC}/SomethingNew")[1] == "admin"  # undeclared in a declared service: fail closed
    assert peer_address("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_address("ipv6:[::1]:5555") == "::1"
    assert peer_address("unix:/tmp/x") is None


def test_real_grpc_front_end(repo: Path) -> None:
    """The inhouse gRPC front end with --auth, called with tritonclient's gRPC client."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from conftest import run_server

    data = repo.parent / "data"
    store = KeyStore(data)
    infer_key = store.create("app", ["infer"], models=["add"])[0]
    admin_key = store.create("ops", ["admin"])[0]
    any_model_key = store.create("dash", ["infer"])[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add,mlp") as srv:
        assert srv.grpc_target is not None
        c = grpcclient.InferenceServerClient(srv.grpc_target)
        assert c.is_server_live()  # liveness stays open
        x = np.ones((1, 4), np.float32)
        inputs = [grpcclient.InferInput("a", [1, 4], "FP32"), grpcclient.InferInput("b", [1, 4], "FP32")]
        for i in inputs:
            i.set_data_from_numpy(x)
        for headers, status in ((None, "StatusCode.UNAUTHENTICATED"),
                                ({"authorization": "Bearer ih_0123456789abcdef_no"}, "StatusCode.UNAUTHENTICATED"),
                                ({"authorization": f"Bearer {admin_key}"}, "StatusCode.PERMISSION_DENIED")):
            with pytest.raises(InferenceServerException) as ei:
                c.infer("add", inputs, headers=headers)
            assert ei.value.status() == status, ei.value
        res = c.infer("add", inputs, headers={"authorization": f"Bearer {infer_key}"})
        assert res.as_numpy("out").tolist() == [[2.0] * 4]
        res = c.infer("add", inputs, headers={"x-api-key": infer_key})
        assert res.as_numpy("out").tolist() == [[2.0] * 4]
        with pytest.raises(InferenceServerException) as ei:  # model outside the key's list
            c.get_model_metadata("mlp", headers={"x-api-key": infer_key})
        assert ei.value.status() == "StatusCode.PERMISSION_DENIED"
        # statistics: of its own model yes; of another model or of every model at once, no
        assert c.get_inference_statistics("add", headers={"x-api-key": infer_key}).model_stats[0].name == "add"
        for name in ("mlp", ""):
            with pytest.raises(InferenceServerException) as ei:
                c.get_inference_statistics(name, headers={"x-api-key": infer_key})
            assert ei.value.status() == "StatusCode.PERMISSION_DENIED", name
        assert len(c.get_inference_statistics("", headers={"x-api-key": any_model_key}).model_stats) == 2
        with pytest.raises(InferenceServerException) as ei:  # infer keys may not unload
            c.unload_model("mlp", headers={"x-api-key": infer_key})
        assert ei.value.status() == "StatusCode.PERMISSION_DENIED"
        c.unload_model("mlp", headers={"x-api-key": admin_key})
        c.close()
    log = AuditLog(data)
    rows = [r for r in log.entries() if r["transport"] == "grpc"]
    assert log.verify().ok
    log.close()
    assert [(r["status"], r["code"]) for r in rows[:3]] == [(401, 4001), (401, 4001), (403, 4003)]
    assert rows[3]["action"] == "infer" and rows[3]["status"] == 200 and rows[3]["model"] == "add"
    assert any(r["action"] == "repository.unload" and r["status"] == 200 for r in rows)


def test_real_grpc_content_policy(tmp_path: Path) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from conftest import run_server
    from models import identity_model, write_model

    repo = tmp_path / "models"
    write_model(repo, "guarded", identity_model(8), {"policy": {"deny_patterns": ["(?i)drop table"]}})
    with run_server(repo, data_dir=tmp_path / "data") as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_target)

        def call(model: str, text: str) -> Any:
            x = grpcclient.InferInput("x", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
            return c.infer(model, [x])

        assert call("guarded", "hello").as_numpy("y").tolist() == [[b"hello"]]
        with pytest.raises(InferenceServerException) as ei:
            call("guarded", "please DROP TABLE users")
        assert ei.value.status() == "StatusCode.INVALID_ARGUMENT" and "5001" in str(ei.value), ei.value
        c.close()


TEXT = "Customer 13800138000, mail wang@example.cn"


def test_real_grpc_pii_redaction(tmp_path: Path) -> None:
    """BYTES inputs of ModelInfer / ModelStreamInfer are redacted before the model sees them
    (raw_input_contents from tritonclient, typed bytes_contents from grpcio) and the answer gets
    the originals back (or PII masked), as on REST. An identity model shows what it saw."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from conftest import run_server
    from inhouse.protocols.proto import grpc_service_pb2 as pb
    from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
    from models import identity_model, write_model

    repo = tmp_path / "models"
    write_model(repo, "echo", identity_model(8), {"pii": {"inputs": True, "outputs": "restore"}})
    write_model(repo, "echo-red", identity_model(8), {"pii": {"inputs": True, "outputs": "redact"}})
    write_model(repo, "echo-seen", identity_model(8), {"pii": {"inputs": True, "outputs": "off"}})
    write_model(repo, "mask-out", identity_model(8), {"pii": {"outputs": "redact"}})
    data = tmp_path / "data"
    with run_server(repo, data_dir=data, audit=True) as srv:
        assert srv.grpc_target is not None
        c = grpcclient.InferenceServerClient(srv.grpc_target)

        def x(*texts: bytes) -> Any:
            t = grpcclient.InferInput("x", [1, len(texts)], "BYTES")
            t.set_data_from_numpy(np.array([list(texts)], dtype=object))
            return t

        def call(model: str, *texts: bytes) -> list[bytes]:
            return list(c.infer(model, [x(*texts)]).as_numpy("y").ravel())

        assert call("echo", TEXT.encode(), b"no pii here") == [TEXT.encode(), b"no pii here"]
        assert call("echo-red", TEXT.encode()) == [b"Customer [PHONE_1], mail [EMAIL_1]"]
        assert call("echo-seen", TEXT.encode(), b"a@b.io", b"again 13800138000") == [
            b"Customer [PHONE_1], mail [EMAIL_1]", b"[EMAIL_2]", b"again [PHONE_1]"]
        assert call("mask-out", TEXT.encode()) == [b"Customer [PHONE], mail [EMAIL]"]

        # typed contents (bytes_contents), answered in typed contents, with plain grpcio
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            req = pb.ModelInferRequest(model_name="echo-seen", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="BYTES", shape=[1, 1], contents=pb.InferTensorContents(
                    bytes_contents=[TEXT.encode()]))])
            req.parameters["binary_data_output"].bool_param = False
            resp = stub.ModelInfer(req)
            assert list(resp.outputs[0].contents.bytes_contents) == [b"Customer [PHONE_1], mail [EMAIL_1]"]
            req.model_name = "echo"
            assert list(stub.ModelInfer(req).outputs[0].contents.bytes_contents) == [TEXT.encode()]

        # a stream: several requests, answers restored whichever request they belong to
        got: queue.Queue[Any] = queue.Queue()
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        texts = {"r1": "call 13800138000", "r2": "mail wang@example.cn or 13900139000", "r3": "call 13800138000"}
        for rid, text in texts.items():
            c.async_stream_infer("echo", [x(text.encode())], request_id=rid)
        c.async_stream_infer("echo-seen", [x(b"mail wang@example.cn")], request_id="seen")
        answers = {}
        for _ in range(len(texts) + 1):
            result, error = got.get(timeout=60)
            assert error is None, error
            answers[result.get_response().id] = result.as_numpy("y").ravel()[0].decode()
        c.stop_stream()
        assert answers == {**texts, "seen": "mail [EMAIL_1]"}
        c.close()
    log = AuditLog(data)
    rows = [r for r in log.entries() if r["transport"] == "grpc"]
    assert log.verify().ok
    log.close()
    assert not any("13800138000" in str(r) or "wang@example.cn" in str(r) for r in rows)
    assert any(r["model"] == "echo" and '"pii_redacted":2' in (r["detail"] or "") for r in rows)


def test_streamed_generation_pieces_are_restored() -> None:
    """Generated text arrives in pieces that cut placeholders apart; each request id is joined
    on its own, and the final response flushes what was held back."""
    from inhouse.core.spec import ModelSpec
    from inhouse.protocols.kserve_v2.grpc_service import TEXTS
    from inhouse.protocols.proto import grpc_service_pb2 as pb
    from inhouse.security.pipeline import Exchange

    spec = ModelSpec.model_validate({"name": "chat", "backend": "transformers", "task": "chat",
                                     "pii": {"inputs": True, "outputs": "restore"}})
    exchange = Exchange(lambda model: spec if model == "chat" else None, TEXTS)
    for rid, text in (("a", b"call 13800138000"), ("b", b"\xff\xfe not utf-8, mail a@b.io")):
        req = pb.ModelInferRequest(model_name="chat", id=rid, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="text_input", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(
                bytes_contents=[text]))])
        exchange.redact_request(Call(transport="grpc", action="infer.stream", scope="infer"), req, "chat")
        assert req.inputs[0].contents.bytes_contents[0] in (b"call [PHONE_1]", b"\xff\xfe not utf-8, mail [EMAIL_1]")

    def piece(rid: str, text: str, final: bool) -> str:
        out = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
            model_name="chat", id=rid, outputs=[pb.ModelInferResponse.InferOutputTensor(
                name="text_output", datatype="BYTES", shape=[1])],
            raw_output_contents=[len(text.encode()).to_bytes(4, "little") + text.encode()]))
        out.infer_response.parameters["triton_final_response"].bool_param = final
        exchange.render(out)
        raw = out.infer_response.raw_output_contents[0]
        return raw[4:].decode()

    got = [piece("a", "Sure: [PH", False), piece("b", "[EMA", False), piece("a", "ONE_1] ok [", False),
           piece("b", "IL_1]", False), piece("a", "PHONE_1", False), piece("a", "]", True),
           piece("b", " end [EM", False), piece("b", "", True)]
    assert got == ["Sure: ", "", "13800138000 ok ", "a@b.io", "", "13800138000", " end ", "[EM"]


def test_real_grpc_rules_without_keys_or_audit(tmp_path: Path) -> None:
    """A server with nothing to admit or audit (no keys, no audit log) skips the call record on
    gRPC, but a model's PII rules still apply there; a model without rules is answered as is."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from conftest import run_server
    from models import identity_model, write_model

    repo = tmp_path / "models"
    write_model(repo, "echo-seen", identity_model(8), {"pii": {"inputs": True, "outputs": "off"}})
    write_model(repo, "plain", identity_model(8))
    with run_server(repo, data_dir=tmp_path / "data") as srv:
        assert not srv.server.security.active
        c = grpcclient.InferenceServerClient(srv.grpc_target)

        def call(model: str, text: str) -> list[bytes]:
            x = grpcclient.InferInput("x", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
            return list(c.infer(model, [x]).as_numpy("y").ravel())

        assert call("echo-seen", TEXT) == [b"Customer [PHONE_1], mail [EMAIL_1]"]
        assert call("plain", TEXT) == [TEXT.encode()]
        c.close()
