"""Every HTTP route the server mounts declares what the security layer needs, and the pipeline
enforces it. The routes are walked from the served app itself, so a route added without a
``Guard``, or one that lets a caller through without the declared scope, fails here whatever
protocol adapter it belongs to."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import BaseRoute, Route

from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore
from inhouse.security.pipeline import guard_of
from models import add_model, write_model

# path parameters filled so the route matches (a model the server loads, a version it serves)
PARAMS = {"model": "add", "version": "1", "key_id": "no-such-key", "response_id": "resp_none"}
_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def _routes(routes: Iterable[BaseRoute]) -> Iterator[Route]:
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        elif isinstance(route, Route):
            yield route


def _calls(routes: Iterable[Route]) -> Iterator[tuple[str, str, Any]]:
    for route in routes:
        path = _PARAM.sub(lambda m: PARAMS.get(m.group(1), "x"), route.path)
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            yield method, path, guard_of(route.endpoint)


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    root = tmp_path_factory.mktemp("guards")
    repo = root / "models"
    repo.mkdir()
    write_model(repo, "add", add_model(), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]})
    store = KeyStore(root / "data")
    keys = {scope: store.create(f"only-{scope}", [scope])[0] for scope in ("infer", "admin", "metrics")}
    store.close()
    with run_server(repo, auth=True, data_dir=root / "data", load="add") as srv:
        yield srv, keys


def test_every_route_declares_a_guard(guarded_server: tuple[RunningServer, dict[str, str]]) -> None:
    srv, _ = guarded_server
    routes = list(_routes(srv.server.app.routes))
    assert len(routes) > 40  # the walk reached the included routers
    undeclared = [(method, path) for method, path, guard in _calls(routes) if guard is None]
    assert undeclared == []


def test_declared_scopes_are_enforced(guarded_server: tuple[RunningServer, dict[str, str]]) -> None:
    """Without a key every declared route but the open ones answers 401 (4001); with a valid key
    that lacks the declared scope, 403 (4003); with the right key, a read is never refused."""
    srv, keys = guarded_server
    other = {"infer": keys["metrics"], "admin": keys["infer"], "metrics": keys["infer"]}
    wrong: list[tuple[str, str, int, int | None]] = []

    def refused(r: httpx.Response, status: int) -> bool:
        code = {401: "4001", 403: "4003"}[status]
        return bool(r.status_code == status and r.headers.get("inhouse-error-code") == code)

    with srv.client() as c:
        for method, path, guard in _calls(_routes(srv.server.app.routes)):
            scope = guard.scope
            if scope == "readiness":  # readiness is open unless the server closes it behind 'metrics'
                scope = "open" if srv.server.settings.open_readiness else "metrics"
            body: dict[str, Any] | None = {} if method in ("POST", "PUT", "PATCH") else None
            r = c.request(method, path, json=body)
            if scope == "open":
                if r.status_code in (401, 403):
                    wrong.append((method, path, r.status_code, None))
                continue
            if not refused(r, 401):
                wrong.append((method, path, r.status_code, 401))
            if scope in other:
                r = c.request(method, path, json=body, headers={"authorization": f"Bearer {other[scope]}"})
                if not refused(r, 403):
                    wrong.append((method, path, r.status_code, 403))
            if method == "GET":  # reads only: a write with the right key would change the server
                key = keys[scope] if scope in keys else keys["infer"]
                r = c.get(path, headers={"authorization": f"Bearer {key}"})
                if r.status_code in (401, 403) or r.status_code >= 500:
                    wrong.append((method, path, r.status_code, 200))
    assert wrong == []


def test_an_undeclared_route_is_admins_only(repo: Path) -> None:
    """A route some future adapter adds without a declaration: an infer key may not use it."""
    from fastapi import APIRouter

    data = repo.parent / "data"
    store = KeyStore(data)
    infer, admin = store.create("app", ["infer"])[0], store.create("ops", ["admin"])[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add") as srv:
        router = APIRouter()

        @router.get("/v1/undeclared")
        async def undeclared() -> dict[str, bool]:
            return {"reached": True}

        srv.server.app.include_router(router)
        with srv.client() as c:
            r = c.get("/v1/undeclared", headers={"authorization": f"Bearer {infer}"})
            assert r.status_code == 403 and r.headers["inhouse-error-code"] == "4003"
            r = c.get("/v1/undeclared", headers={"authorization": f"Bearer {admin}"})
            assert r.status_code == 200 and r.json() == {"reached": True}
