"""Every error code through every wire format: the renderers in ``protocols/errors.py`` for the
whole code × format table, then real refusals from a real server over each transport (KServe v2
REST, OpenAI, Anthropic, gRPC), so that no route or middleware renders an error its own way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from starlette.testclient import TestClient
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from conftest import RunningServer, run_server
from inhouse.errors import InhouseError, error_table
from inhouse.protocols.errors import (
    ErrorResponses,
    anthropic_error_response,
    error_renderer,
    grpc_error,
    openai_error_response,
    v2_error_parts,
    v2_error_response,
)
from inhouse.security.keys import KeyStore
from models import add_model, write_model

MESSAGE = "Something was wrong with the request; change it and try again."
ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                   "rate_limit_error", "request_too_large", "api_error"}


def _error_classes() -> list[type[InhouseError]]:
    found: list[type[InhouseError]] = []
    stack = list(InhouseError.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        found.append(cls)
    return sorted(found, key=lambda c: (c.code, c.__name__))


# the modules that define error classes outside inhouse.errors, so that the table is whole
# whichever test files ran before this one
import inhouse.security.audit_commit  # noqa: E402
import inhouse.tools.systemd  # noqa: E402
import inhouse.transports.grpc.server  # noqa: E402, F401

CLASSES = _error_classes()
HINTS = [{}, {"Retry-After": "7"}]


def test_the_table_walks_every_error_class() -> None:
    assert [(c.code, c.__name__, c.http_status, c.grpc_status) for c in _error_classes()] == error_table()
    assert set(_error_classes()) == set(CLASSES)  # nothing imported since is left out of the cases below


# ---- the renderers: every code × every format ---------------------------------------------------
def _http_common(status: int, headers: httpx.Headers | Any, cls: type[InhouseError], hints: dict[str, str]) -> None:
    assert status == cls.http_status
    assert headers["inhouse-error-code"] == str(cls.code)
    assert headers["content-type"] == "application/json"
    if hints:
        assert headers["retry-after"] == hints["Retry-After"]
    else:
        assert "retry-after" not in headers


@pytest.mark.parametrize("hints", HINTS, ids=["plain", "retry-after"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.code}-{c.__name__}")
def test_v2_json(cls: type[InhouseError], hints: dict[str, str]) -> None:
    resp = v2_error_response(cls(MESSAGE, headers=hints))
    _http_common(resp.status_code, resp.headers, cls, hints)
    assert orjson.loads(resp.body) == {"error": f"[{cls.code}] {MESSAGE}"}
    # the hot infer path sends exactly what the framework's response sends
    status, raw, body = v2_error_parts(cls(MESSAGE, headers=hints))
    assert (status, raw, body) == (resp.status_code, resp.raw_headers, resp.body)


@pytest.mark.parametrize("hints", HINTS, ids=["plain", "retry-after"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.code}-{c.__name__}")
def test_openai(cls: type[InhouseError], hints: dict[str, str]) -> None:
    resp = openai_error_response(cls(MESSAGE, headers=hints, details={"param": "model"}))
    _http_common(resp.status_code, resp.headers, cls, hints)
    assert orjson.loads(resp.body) == {"error": {"message": MESSAGE, "type": cls.openai_type, "param": "model",
                                                 "code": str(cls.code)}}


@pytest.mark.parametrize("hints", HINTS, ids=["plain", "retry-after"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.code}-{c.__name__}")
def test_anthropic(cls: type[InhouseError], hints: dict[str, str]) -> None:
    resp = anthropic_error_response(cls(MESSAGE, headers=hints))
    _http_common(resp.status_code, resp.headers, cls, hints)
    body = orjson.loads(resp.body)
    assert body["type"] == "error" and body["error"]["message"] == f"[{cls.code}] {MESSAGE}"
    kind = body["error"]["type"]
    assert kind in ANTHROPIC_TYPES
    if cls.http_status == 413:
        assert kind == "request_too_large"
    elif cls.openai_type in ("server_error", "timeout_error"):
        assert kind == "api_error"
    else:
        assert kind == cls.openai_type


def _rich(metadata: tuple[tuple[str, str | bytes], ...]) -> Any:
    raw = dict(metadata)["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


def _check_rich(rich: Any, code: int, status: grpc.StatusCode, details: str, retry: int | None) -> None:
    assert rich.code == status.value[0] and rich.message == details
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info) and info.domain == "inhouse" and info.metadata["code"] == str(code)
    if retry is None:
        assert len(rich.details) == 1
    else:
        retry_info = error_details_pb2.RetryInfo()
        assert rich.details[1].Unpack(retry_info) and retry_info.retry_delay.seconds == retry


@pytest.mark.parametrize("hints", HINTS, ids=["plain", "retry-after"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.code}-{c.__name__}")
def test_grpc(cls: type[InhouseError], hints: dict[str, str]) -> None:
    status, details, metadata = grpc_error(cls(MESSAGE, headers=hints))
    assert status == grpc.StatusCode[cls.grpc_status]
    assert details == f"[{cls.code}] {MESSAGE}"
    md = dict(metadata)
    assert md["inhouse-error-code"] == str(cls.code)
    assert md.get("retry-after") == (hints["Retry-After"] if hints else None)
    _check_rich(_rich(metadata), cls.code, status, details, int(hints["Retry-After"]) if hints else None)


def test_unexpected_errors_are_a_generic_9000_everywhere() -> None:
    secret = RuntimeError("password=hunter2 in /srv/internal.py")
    for render in (v2_error_response, openai_error_response, anthropic_error_response):
        resp = render(secret)
        assert resp.status_code == 500 and resp.headers["inhouse-error-code"] == "9000"
        assert b"hunter2" not in resp.body and b"reference" in resp.body
    status, details, _ = grpc_error(secret)
    assert status == grpc.StatusCode.INTERNAL and details.startswith("[9000] ") and "hunter2" not in details


@pytest.mark.parametrize(("path", "render"), [
    ("/v1/messages", anthropic_error_response), ("/v1/messages/count_tokens", anthropic_error_response),
    ("/v1/chat/completions", openai_error_response), ("/v1/embeddings", openai_error_response),
    ("/v1", openai_error_response), ("/v2/models/add/infer", v2_error_response),
    ("/v2/security/keys", v2_error_response), ("/metrics", v2_error_response)])
def test_the_format_follows_the_path(path: str, render: Any) -> None:
    assert error_renderer(path) is render


def test_route_exceptions_are_answered_inside_the_middleware() -> None:
    """What a route raises is rendered by ErrorResponses, so the middleware outside it (security
    audit, access log) sees an ordinary response; a stream that started is not answered twice."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from inhouse.errors import ModelNotFoundError

    async def missing(request: Any) -> Any:
        raise ModelNotFoundError("No model 'nope'; list the models with GET /v2/models.")

    async def broken(request: Any) -> Any:
        raise RuntimeError("internal detail")

    async def late(request: Any) -> Any:
        async def body() -> Any:
            yield b"data: 1\n\n"
            raise RuntimeError("after the headers")
        return StreamingResponse(body(), media_type="text/event-stream")

    seen: list[int] = []

    def outer(app: Any) -> Any:  # stands for the security / access-log middleware
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            async def spy(message: Any) -> None:
                if message["type"] == "http.response.start":
                    seen.append(message["status"])
                await send(message)
            await app(scope, receive, spy)
        return wrapped

    app = Starlette(routes=[Route("/v2/models/nope", missing), Route("/v1/chat/completions", broken),
                            Route("/v1/messages", late)])
    app.add_middleware(ErrorResponses)
    app.add_middleware(outer)
    with TestClient(app, raise_server_exceptions=True) as c:
        _v2(c.get("/v2/models/nope"), 404, 1002)
        r = c.get("/v1/chat/completions")
        assert _openai(r, 500, 9000)["message"].startswith("Internal server error (reference ")
        with pytest.raises(RuntimeError, match="after the headers"):
            c.get("/v1/messages")
    assert seen == [404, 500, 200]


# ---- real refusals from a real server ----------------------------------------------------------
X = np.ones((1, 4), np.float32).ravel().tolist()
INFER = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": X},
                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": X}]}
CHAT = {"model": "add", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": "add", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
LIMIT = 4096


def _v2(r: httpx.Response, status: int, code: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["inhouse-error-code"] == str(code)
    msg: str = r.json()["error"]
    assert msg.startswith(f"[{code}] "), msg
    return msg


def _openai(r: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["inhouse-error-code"] == str(code)
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == str(code) and not err["message"].startswith("["), err
    return err


def _anthropic(r: httpx.Response, status: int, code: int, kind: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["inhouse-error-code"] == str(code)
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    msg: str = body["error"]["message"]
    assert msg.startswith(f"[{code}] "), msg
    return msg


def _grpc_fails(call: Any, status: grpc.StatusCode, code: int, retry: bool = False) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == status, err.details()
    assert err.details().startswith(f"[{code}] "), err.details()
    md = dict(err.trailing_metadata() or ())
    assert md.get("inhouse-error-code") == str(code), md
    rich = rpc_status.from_call(err)
    assert rich is not None, "no grpc-status-details-bin"
    seconds = None
    if retry:
        assert md["retry-after"].isdigit() and 1 <= int(md["retry-after"]) <= 60, md
        seconds = int(md["retry-after"])
    _check_rich(rich, code, status, err.details(), seconds)
    return err


def _infer_request(model: str = "add") -> Any:
    req = tpb.ModelInferRequest(model_name=model)
    for name in ("a", "b"):
        req.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return req


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """No auth, a small body limit: refusals that need no key."""
    root = tmp_path_factory.mktemp("errors") / "models"
    root.mkdir()
    write_model(root, "add", add_model(), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]})
    with run_server(root, max_request_bytes=LIMIT, load="add") as srv:
        yield srv


def test_rest_refusals_without_keys(open_server: RunningServer) -> None:
    big = b'{"x": "' + b"y" * (LIMIT * 2) + b'"}'
    with open_server.client() as c:
        # KServe v2: the fast infer path and the framework's routes
        assert "nope" in _v2(c.post("/v2/models/nope/infer", json=INFER), 404, 1002)
        _v2(c.post("/v2/models/add/infer", content=b"{not json"), 400, 2001)
        _v2(c.post("/v2/models/add/infer", content=big), 413, 2013)
        assert "nope" in _v2(c.get("/v2/models/nope"), 404, 1002)
        _v2(c.get("/v2/models/nope/ready"), 404, 1002)
        _v2(c.post("/v2/repository/models/add/load", content=b"{not json"), 400, 2001)
        _v2(c.post("/v2/repository/models/add/load", json={"parameters": {"other": 1}}), 400, 2001)
        _v2(c.get("/v2/security/keys"), 403, 4003)  # managing keys needs --auth
        assert "No such endpoint" in _v2(c.get("/v2/no/such/route"), 404, 2004)
        # OpenAI
        _openai(c.post("/v1/chat/completions", content=b"{not json"), 400, 2001)
        _openai(c.post("/v1/chat/completions", content=big), 413, 2013)
        _openai(c.post("/v1/embeddings", json={"input": "x"}), 400, 2001)
        assert _openai(c.get("/v1/models/nope"), 404, 1002)["param"] == "model"
        # Anthropic: a body too large is refused by the security middleware before any route
        _anthropic(c.post("/v1/messages", content=big), 413, 2013, "request_too_large")
        _anthropic(c.post("/v1/messages", content=b"{not json"), 400, 2001, "invalid_request_error")
        _anthropic(c.post("/v1/messages/count_tokens", json={"messages": []}), 400, 2001,
                   "invalid_request_error")


def test_grpc_refusals_without_keys(open_server: RunningServer) -> None:
    assert open_server.grpc_target is not None
    with grpc.insecure_channel(open_server.grpc_target) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        _grpc_fails(lambda: stub.ModelInfer(_infer_request("nope")), grpc.StatusCode.NOT_FOUND, 1002)
        _grpc_fails(lambda: stub.ModelMetadata(tpb.ModelMetadataRequest(name="nope")), grpc.StatusCode.NOT_FOUND,
                    1002)
        _grpc_fails(lambda: stub.RepositoryModelLoad(tpb.RepositoryModelLoadRequest()),
                    grpc.StatusCode.INVALID_ARGUMENT, 2001)
        health = health_pb2_grpc.HealthStub(ch)
        _grpc_fails(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope")), grpc.StatusCode.NOT_FOUND,
                    1002)
        # a failed request inside a stream is answered in-band, in the same [code] form
        out = list(stub.ModelStreamInfer(iter([_infer_request("nope")]), timeout=60))
        assert len(out) == 1 and out[0].error_message.startswith("[1002] ")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    base = tmp_path_factory.mktemp("errors-auth")
    root = base / "models"
    root.mkdir()
    write_model(root, "add", add_model(), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]})
    data = base / "data"
    store = KeyStore(data)
    keys = {
        "infer": store.create("app", ["infer"])[0],
        "metrics": store.create("prom", ["metrics"])[0],
        "slow_rest": store.create("slow-rest", ["infer"], rate="2/minute")[0],
        "slow_grpc": store.create("slow-grpc", ["infer"], rate="2/minute")[0],
        "expired": store.create("old", ["infer"], expires_at=time.time() - 1)[0],
    }
    store.close()
    with run_server(root, auth=True, data_dir=data, load="add") as srv:
        yield srv, keys


def test_rest_refusals_with_keys(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, k = secured
    with srv.client() as c:
        r = c.post("/v2/models/add/infer", json=INFER)
        _v2(r, 401, 4001)
        assert r.headers["www-authenticate"] == "Bearer"
        _v2(c.get("/v2/models/add"), 401, 4001)
        _v2(c.post("/v2/models/add/infer", json=INFER, headers={"x-api-key": k["expired"]}), 401, 4001)
        _v2(c.post("/v2/models/add/infer", json=INFER, headers={"x-api-key": k["metrics"]}), 403, 4003)
        _v2(c.get("/v2/security/keys", headers={"x-api-key": k["infer"]}), 403, 4003)
        _openai(c.post("/v1/chat/completions", json=CHAT), 401, 4001)
        _openai(c.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": k["metrics"]}), 403, 4003)
        _anthropic(c.post("/v1/messages", json=MESSAGES), 401, 4001, "authentication_error")
        _anthropic(c.post("/v1/messages", json=MESSAGES, headers={"x-api-key": k["metrics"]}), 403, 4003,
                   "permission_error")
        # the rate limit: Retry-After over REST
        with srv.client(headers={"x-api-key": k["slow_rest"]}) as slow:
            assert [slow.post("/v2/models/add/infer", json=INFER).status_code for _ in range(2)] == [200, 200]
            r = slow.post("/v2/models/add/infer", json=INFER)
            _v2(r, 429, 4029)
            assert 1 <= int(r.headers["retry-after"]) <= 60
            r = slow.post("/v1/messages", json=MESSAGES)
            _anthropic(r, 429, 4029, "rate_limit_error")
            assert 1 <= int(r.headers["retry-after"]) <= 60


def test_grpc_refusals_with_keys(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, k = secured
    assert srv.grpc_target is not None
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        _grpc_fails(lambda: stub.ModelInfer(_infer_request()), grpc.StatusCode.UNAUTHENTICATED, 4001)
        _grpc_fails(lambda: stub.ModelInfer(_infer_request(), metadata=[("x-api-key", k["expired"])]),
                    grpc.StatusCode.UNAUTHENTICATED, 4001)
        _grpc_fails(lambda: stub.ModelInfer(_infer_request(), metadata=[("authorization", f"Bearer {k['metrics']}")]),
                    grpc.StatusCode.PERMISSION_DENIED, 4003)
        _grpc_fails(lambda: stub.RepositoryIndex(tpb.RepositoryIndexRequest(), metadata=[("x-api-key", k["infer"])]),
                    grpc.StatusCode.PERMISSION_DENIED, 4003)


def test_grpc_rate_limit_carries_retry_info(secured: tuple[RunningServer, dict[str, str]]) -> None:
    """4029 over gRPC: retry-after metadata and a RetryInfo in grpc-status-details-bin."""
    srv, k = secured
    assert srv.grpc_target is not None
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = tpb_grpc.GRPCInferenceServiceStub(ch)
        slow = [("x-api-key", k["slow_grpc"])]
        for _ in range(2):
            stub.ModelInfer(_infer_request(), metadata=slow)
        _grpc_fails(lambda: stub.ModelInfer(_infer_request(), metadata=slow), grpc.StatusCode.RESOURCE_EXHAUSTED,
                    4029, retry=True)
        # a refusal of a streaming call goes through the same renderer
        _grpc_fails(lambda: list(stub.ModelStreamInfer(iter([_infer_request()]), metadata=slow, timeout=60)),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, 4029, retry=True)
