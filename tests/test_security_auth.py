"""The auth matrix against a real server: REST (KServe v2), OpenAI and Anthropic routes, with
real clients; secure defaults at start-up; rate limits; IP allow-lists and trusted proxies."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import httpx
import numpy as np
import openai
import pytest

from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore
from inhouse.server import StartupError

X = np.ones((1, 4), np.float32).ravel().tolist()
INFER = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": X},
                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": X}]}


def make_keys(data_dir: Path) -> dict[str, str]:
    store = KeyStore(data_dir)
    keys = {
        "infer": store.create("app", ["infer"])[0],
        "admin": store.create("ops", ["admin"])[0],
        "add_only": store.create("add-only", ["infer"], models=["add"])[0],
        "expired": store.create("old", ["infer"], expires_at=time.time() - 1)[0],
        "revoked": store.create("gone", ["infer"])[0],
        "other_ip": store.create("elsewhere", ["infer"], allow_ips=["10.9.0.0/16"])[0],
        "metrics": store.create("prom", ["metrics"])[0],
    }
    store.revoke("gone")
    store.close()
    return keys


@pytest.fixture
def secured(repo: Path) -> tuple[RunningServer, dict[str, str]]:
    data = repo.parent / "data"
    keys = make_keys(data)
    with run_server(repo, auth=True, data_dir=data, load="add,mlp") as srv:
        yield srv, keys


def _code(r: httpx.Response) -> int:
    return int(r.headers["inhouse-error-code"])


def test_rest_auth_matrix(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, k = secured
    with srv.client() as c:
        # liveness and readiness stay open; everything else needs a key
        assert c.get("/v2/health/live").status_code == 200
        r = c.post("/v2/models/add/infer", json=INFER)
        assert r.status_code == 401 and _code(r) == 4001 and "API key" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v2/health/ready").status_code == 200  # readiness too (open_readiness)
        assert c.get("/openapi.json").status_code == 401
        assert c.get("/no/such/route").status_code == 401  # route existence is not revealed
        cases = {
            "ih_0123456789abcdef_wrong": (401, 4001),
            "not-even-shaped-like-a-key": (401, 4001),
            k["infer"][:-2] + "xx": (401, 4001),  # right key id, wrong secret
            k["revoked"]: (401, 4001),
            k["expired"]: (401, 4001),
            k["admin"]: (403, 4003),  # wrong scope
            k["metrics"]: (403, 4003),
            k["other_ip"]: (403, 4003),  # key bound to another network
        }
        for key, (status, code) in cases.items():
            r = c.post("/v2/models/add/infer", json=INFER, headers={"authorization": f"Bearer {key}"})
            assert (r.status_code, _code(r)) == (status, code), (key, r.text)
        ok = c.post("/v2/models/add/infer", json=INFER, headers={"authorization": f"Bearer {k['infer']}"})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [2.0] * 4
        assert len(ok.headers.get_list("x-request-id")) == 1
        # x-api-key works too; per-key model list
        r = c.post("/v2/models/add/infer", json=INFER, headers={"x-api-key": k["add_only"]})
        assert r.status_code == 200
        r = c.get("/v2/models/mlp", headers={"x-api-key": k["add_only"]})
        assert r.status_code == 403 and "may not use model 'mlp'" in r.json()["error"]
        # admin scope for the repository; infer keys may not load models
        r = c.post("/v2/repository/models/mlp/unload", headers={"x-api-key": k["infer"]})
        assert r.status_code == 403
        assert c.post("/v2/repository/models/mlp/unload", headers={"x-api-key": k["admin"]}).status_code == 200
        assert c.post("/v2/repository/index", headers={"x-api-key": k["admin"]}).status_code == 200
        assert c.get("/v2/health/ready", headers={"x-api-key": k["metrics"]}).status_code == 200
        assert c.get("/openapi.json", headers={"x-api-key": k["infer"]}).status_code == 200
        # wrong auth scheme is not a key
        r = c.get("/v2", headers={"authorization": f"Basic {k['infer']}"})
        assert r.status_code == 401


def test_revocation_is_immediate(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, k = secured
    with srv.client(headers={"x-api-key": k["infer"]}) as c:
        assert c.post("/v2/models/add/infer", json=INFER).status_code == 200
        store = KeyStore(srv.server.settings.data_dir)  # another connection, like the CLI
        assert store.revoke("app")
        store.close()
        r = c.post("/v2/models/add/infer", json=INFER)
        assert r.status_code == 401 and "revoked" in r.json()["error"]


def test_openai_and_anthropic_routes(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, k = secured
    base = srv.url + "/v1"
    with pytest.raises(openai.AuthenticationError) as ei:
        openai.OpenAI(base_url=base, api_key="ih_0123456789abcdef_nope", max_retries=0).chat.completions.create(
            model="add", messages=[{"role": "user", "content": "hi"}])
    assert ei.value.body["code"] == "4001"  # type: ignore[index]
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=base, api_key=k["admin"], max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError) as ei:  # model from the body vs. the key's model list
        openai.OpenAI(base_url=base, api_key=k["add_only"], max_retries=0).chat.completions.create(
            model="mlp", messages=[{"role": "user", "content": "hi"}])
    assert "may not use model 'mlp'" in str(ei.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key=k["revoked"], max_retries=0).embeddings.create(model="add", input="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key=k["expired"], max_retries=0).embeddings.create(model="add", input="x")
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=base, api_key=k["other_ip"], max_retries=0).embeddings.create(model="add", input="x")
    # Anthropic's client gets Anthropic's error shape
    with pytest.raises(anthropic.AuthenticationError) as ea:
        anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0).messages.create(
            model="add", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert ea.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=srv.url, api_key=k["metrics"], max_retries=0).messages.create(
            model="add", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    # an authorised call passes the security layer (the route itself may not exist on this build)
    with httpx.Client(base_url=srv.url) as c:
        r = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {k['add_only']}"},
                   json={"model": "add", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code not in (401, 403), r.text
        r = c.post("/v1/chat/completions", headers={"authorization": f"Bearer {k['add_only']}"},
                   content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "2001"


def test_refuses_exposed_address_without_auth(repo: Path) -> None:
    with pytest.raises(StartupError, match="without authentication"), run_server(repo, host="0.0.0.0"):
        pass
    with run_server(repo, host="0.0.0.0", insecure=True, load="add") as srv, srv.client() as c:
        assert c.post("/v2/models/add/infer", json=INFER).status_code == 200


def test_rate_limits_per_key_and_ip(repo: Path) -> None:
    data = repo.parent / "data"
    store = KeyStore(data)
    slow_key = store.create("slow", ["infer"], rate="3/minute")[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add") as srv, \
            srv.client(headers={"x-api-key": slow_key}) as c:
        codes = [c.post("/v2/models/add/infer", json=INFER).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.post("/v2/models/add/infer", json=INFER)
        assert _code(r) == 4029 and 1 <= int(r.headers["retry-after"]) <= 60
    with run_server(repo, rate_limit_ip="2/minute", load="add") as srv, srv.client() as c:
        codes = [c.get("/v2/models/add").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert c.get("/v2/health/live").status_code == 200  # liveness is never limited


def test_ip_allow_list_and_trusted_proxies(repo: Path) -> None:
    with run_server(repo, allow_ips=["10.0.0.0/8"], load="add") as srv, srv.client() as c:
        r = c.get("/v2/models/add")
        assert r.status_code == 403 and _code(r) == 4003
        # an untrusted peer cannot talk its way in with X-Forwarded-For
        assert c.get("/v2/models/add", headers={"x-forwarded-for": "10.1.2.3"}).status_code == 403
        assert c.get("/v2/health/live").status_code == 200
    with run_server(repo, allow_ips=["10.0.0.0/8"], trusted_proxies=["127.0.0.1/32"],
                                load="add") as srv, srv.client() as c:
        assert c.get("/v2/models/add", headers={"x-forwarded-for": "10.1.2.3"}).status_code == 200
        assert c.get("/v2/models/add", headers={"x-forwarded-for": "10.1.2.3, 192.168.1.1"}).status_code == 403
        assert c.get("/v2/models/add", headers={"x-forwarded-for": "garbage"}).status_code == 403


def test_load_source_outside_allowed_dirs_is_refused(server: RunningServer, tmp_path: Path) -> None:
    with server.client() as c:
        for source in ("/etc", "../../..", "https://example.com/model"):
            r = c.post("/v2/repository/models/add/load",
                       json={"parameters": {"config": f'{{"source": "{source}"}}'}})
            assert r.status_code == 403 and _code(r) == 4003, r.text
        r = c.post("/v2/repository/models/add/load",
                   json={"parameters": {"config": '{"onnxruntime": {"file": "../../../../etc/passwd"}}'}})
        assert r.status_code == 422 and "outside its version folder" in r.json()["error"]


def test_keys_api(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, k = secured
    with srv.client(headers={"x-api-key": k["admin"]}) as admin:
        assert admin.get("/v2/security/keys", headers={"x-api-key": k["infer"]}).status_code == 403
        r = admin.post("/v2/security/keys", json={"name": "ci", "scopes": ["infer"], "models": ["add"],
                                                  "rate": "10/s"})
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["key"].startswith("ih_") and new["models"] == ["add"] and new["status"] == "active"
        listed = admin.get("/v2/security/keys").json()
        assert any(x["key_id"] == new["key_id"] for x in listed)
        assert not any("key" in x or "digest" in x for x in listed)  # never the keys or their hashes
        with srv.client(headers={"x-api-key": new["key"]}) as c:
            assert c.post("/v2/models/add/infer", json=INFER).status_code == 200
            assert admin.delete(f"/v2/security/keys/{new['key_id']}").json() == {"revoked": [new["key_id"]]}
            assert c.post("/v2/models/add/infer", json=INFER).status_code == 401
        for bad in ({"name": "x", "scopes": ["root"]}, {"name": "x", "scopes": ["infer"], "rate": "fast"},
                    {"name": "x", "scopes": ["infer"], "allow_ips": ["10.0.0.0/99"]}, {"scopes": ["infer"]},
                    {"name": "x", "scopes": "infer"}, [1, 2]):
            r = admin.post("/v2/security/keys", json=bad)
            assert r.status_code == 400 and _code(r) == 2001, (bad, r.text)
        assert admin.delete("/v2/security/keys/nope").status_code == 404


def test_route_classification_fails_closed() -> None:
    from fastapi import FastAPI

    from inhouse.protocols import anthropic, keys_admin, openai
    from inhouse.protocols.kserve_v2 import rest
    from inhouse.security.pipeline import Guard, Texts, guarded
    from inhouse.transports.http.security import RouteGuards

    app = FastAPI()
    for router in (rest.build_router(None, 1), openai.build_router(None, 1, False),  # type: ignore[arg-type]
                   anthropic.build_router(None, 1), keys_admin.build_router(None, 1)):  # type: ignore[arg-type]
        app.include_router(router)
    generate = Texts(request=lambda doc, fn: None)

    @app.post("/v2/models/{model}/versions/{version}/generate_stream")
    @guarded(Guard("generate_stream", "infer", model="path", texts=generate))
    async def generate_stream(model: str, version: str) -> None:  # a route declared as an adapter would
        return None

    guards = RouteGuards()

    def classify(method: str, path: str) -> Guard:
        return guards.find({"type": "http", "method": method, "path": path, "root_path": "", "app": app})[0]

    assert classify("GET", "/v2/health/live").scope == "open"
    assert classify("GET", "/v2/health/live/").scope != "open"  # only the exact liveness paths are open
    assert classify("GET", "/v2/health/ready").scope == "open"  # readiness too, by default (open_readiness)
    assert RouteGuards(open_readiness=False).find(
        {"type": "http", "method": "GET", "path": "/health/ready", "root_path": "", "app": app})[0].scope == "metrics"
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/versions/2/generate_stream", "root_path": "",
             "app": app}
    r, params, template = guards.find(scope)
    assert (r.scope, params["model"], params["version"], r.texts) == ("infer", "m", "2", generate)
    assert template == "/v2/models/{model}/versions/{version}/generate_stream"
    assert classify("POST", "/v2/repository/models/m/load").scope == "admin"
    assert classify("DELETE", "/v2/security/keys/x").action == "keys.revoke"
    assert classify("GET", "/v1/models/some/model").scope == "infer"
    assert classify("POST", "/v1/chat/completions").model == "model"  # named in the body
    assert classify("POST", "/v1/something-new").scope == "admin"  # undeclared, even under /v1: admins only
    assert classify("GET", "/internal/debug").scope == "admin"  # unknown routes: admins only
