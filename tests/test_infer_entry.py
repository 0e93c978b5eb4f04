"""The hot-path entry for v2 infer (transports/http/infer_entry.py) answers exactly as the web
application's own middleware stack and routed endpoint do: the same status, body and headers
for good and bad requests, with and without an API key requirement. Both are driven on the
server's own event loop through httpx's ASGI transport."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import httpx

from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore
from models import add_model, write_model

_VOLATILE = {"traceparent", "x-request-id", "date", "server"}


def _body(n: int, dtype: str = "FP32") -> dict[str, Any]:
    x = [1.0] * (n * 4)
    return {"inputs": [{"name": "a", "shape": [n, 4], "datatype": dtype, "data": x},
                       {"name": "b", "shape": [n, 4], "datatype": dtype, "data": x}]}


def _exchange(srv: RunningServer, app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://inhouse") as c:
            return await c.request(method, path, **kw)

    return srv.call(go())


def _same(srv: RunningServer, method: str, path: str, **kw: Any) -> httpx.Response:
    """The response of the hot entry, after checking it against the application's own stack."""
    hot = _exchange(srv, srv.server.asgi, method, path, **kw)
    framework = _exchange(srv, srv.server.app, method, path, **kw)
    assert hot.status_code == framework.status_code, (path, hot.text, framework.text)
    assert hot.content == framework.content, path
    strip = lambda r: sorted((k, v) for k, v in r.headers.multi_items() if k not in _VOLATILE)  # noqa: E731
    assert strip(hot) == strip(framework), path
    for r in (hot, framework):  # both carry the trace context and request id
        assert r.headers["traceparent"].startswith("00-") and r.headers["x-request-id"]
    return hot


def test_hot_entry_matches_framework_stack(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    with run_server(repo, gzip_min_bytes=2000, max_request_bytes=100_000) as srv:
        ok = _same(srv, "POST", "/v2/models/add/infer", json=_body(2), headers={"x-request-id": "req-1"})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["data"][:2] == [2.0, 2.0]
        assert ok.headers["x-request-id"] == "req-1"
        assert _same(srv, "POST", "/v2/models/add/versions/1/infer", json=_body(1)).status_code == 200
        binary = _same(srv, "POST", "/v2/models/add/infer",
                       json={**_body(1), "parameters": {"binary_data_output": True}})
        assert binary.headers["content-type"] == "application/octet-stream"
        big = _same(srv, "POST", "/v2/models/add/infer", json=_body(300), headers={"accept-encoding": "gzip"})
        assert big.headers["content-encoding"] == "gzip" and big.json()["outputs"][0]["data"][0] == 2.0
        packed = gzip.compress(httpx.Request("POST", "/", json=_body(2)).content)
        assert _same(srv, "POST", "/v2/models/add/infer", content=packed,
                     headers={"content-encoding": "gzip", "content-type": "application/json"}).status_code == 200
        # bad requests: each with its own code
        cases = [
            ("/v2/models/add/infer", {"content": b"{not json"}, 400),
            ("/v2/models/nope/infer", {"json": _body(1)}, 404),
            ("/v2/models/add/versions/x/infer", {"json": _body(1)}, 400),
            ("/v2/models/add/versions/7/infer", {"json": _body(1)}, 404),
            ("/v2/models/add/infer", {"json": _body(1, "INT32")}, 400),
            ("/v2/models/add/infer", {"json": _body(1), "headers": {"inhouse-priority": "high"}}, 400),
            ("/v2/models/add/infer", {"json": _body(5000)}, 413),
            ("/v2/models/add/infer", {"content": b"x", "headers": {"content-encoding": "br"}}, 400),
        ]
        for path, kw, status in cases:
            r = _same(srv, "POST", path, **kw)
            assert r.status_code == status, (path, r.text)
            assert r.headers["inhouse-error-code"].isdigit() and r.json()["error"].startswith("[")
        # anything else is the application's
        assert _exchange(srv, srv.server.asgi, "GET", "/v2/models/add/infer").status_code == 405
        assert _exchange(srv, srv.server.asgi, "GET", "/v2/models/add").json()["name"] == "add"


def test_hot_entry_matches_framework_stack_with_api_keys(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    data = tmp_path / "data"
    keys = KeyStore(data)
    infer_key = keys.create("app", ["infer"])[0]
    metrics_key = keys.create("scraper", ["metrics"])[0]
    other_model = keys.create("other", ["infer"], models=["other"])[0]
    keys.close()
    with run_server(repo, auth=True, data_dir=data, rate_limit_key="1000/s") as srv:
        r = _same(srv, "POST", "/v2/models/add/infer", json=_body(1))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert _same(srv, "POST", "/v2/models/add/infer", json=_body(1),
                     headers={"authorization": "Bearer nope"}).status_code == 401
        assert _same(srv, "POST", "/v2/models/add/infer", json=_body(1),
                     headers={"authorization": f"Bearer {metrics_key}"}).status_code == 403
        assert _same(srv, "POST", "/v2/models/add/infer", json=_body(1),
                     headers={"x-api-key": other_model}).status_code == 403
        ok = _same(srv, "POST", "/v2/models/add/infer", json=_body(1), headers={"x-api-key": infer_key})
        assert ok.status_code == 200
