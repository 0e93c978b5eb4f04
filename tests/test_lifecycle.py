"""Model lifecycle against a real server: version switching under load, failed loads, version
policies, repository polling, and memory really released on unload."""

from __future__ import annotations

import gc
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import RunningServer, run_server
from inhouse.core.manager import ModelState
from models import add_model, mlp_model, sleep_model, slow_request, write_model


def _wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _index(c: httpx.Client) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(e["name"], e.get("version")): e for e in c.post("/v2/repository/index").json()}


def _add(c: httpx.Client, version: str | None = None) -> httpx.Response:
    path = "/v2/models/add" + (f"/versions/{version}" if version else "") + "/infer"
    return c.post(path, json={"inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]})


def _switch_while_busy(srv: RunningServer, c: httpx.Client, repo: Path, old: int, batch: int) -> bool:
    """Load version old+1 while a slow request runs on ``old``. Checks everything a switch
    promises; returns whether the request really was still in flight when the new version
    turned READY (on a busy machine it may finish first; the caller then retries bigger)."""
    new = old + 1
    write_model(repo, "slow", sleep_model(), version=new)
    body, headers = slow_request(batch)
    slow_result: dict[str, Any] = {}

    def run_slow() -> None:
        with srv.client(timeout=120) as c2:
            slow_result["r"] = c2.post("/v2/models/slow/infer", content=body, headers=headers)

    manager = srv.server.manager
    current = manager.resolve("slow")
    assert current.version == old
    events: list[tuple[int | None, ModelState, int]] = []
    listener = lambda _n, v, state: events.append((v, state, current.inflight))  # noqa: E731
    manager.listeners.append(listener)
    t = threading.Thread(target=run_slow)
    t.start()
    _wait_for(lambda: current.inflight > 0, what="the slow request to start")
    r = c.post("/v2/repository/models/slow/load")
    assert r.status_code == 200 and r.json()["versions"] == [str(new)], r.text
    # traffic switched: new requests go to the new version
    small, small_headers = slow_request(1)
    r2 = c.post("/v2/models/slow/infer", content=small, headers=small_headers)
    assert r2.status_code == 200
    assert f'"model_version":"{new}"'.encode() in r2.content[:int(r2.headers["inference-header-content-length"])]
    t.join(120)
    r1 = slow_result["r"]
    assert r1.status_code == 200, r1.text  # the request on the old version completed
    assert f'"model_version":"{old}"'.encode() in r1.content[:int(r1.headers["inference-header-content-length"])]
    srv.call(manager.settle())
    manager.listeners.remove(listener)
    # new READY, then old DRAINING, then old UNLOADED once nothing is in flight on it
    ready_new = next(i for i, e in enumerate(events) if e[:2] == (new, ModelState.READY))
    draining = next(i for i, e in enumerate(events) if e[:2] == (old, ModelState.DRAINING))
    unloaded = next(i for i, e in enumerate(events) if e[:2] == (old, ModelState.UNLOADED))
    assert ready_new < draining < unloaded, events
    assert events[unloaded][2] == 0
    idx = _index(c)
    assert idx[("slow", str(new))]["state"] == "READY" and idx[("slow", str(old))]["state"] == "UNLOADED"
    assert current.model is None and current.scheduler is None
    return events[ready_new][2] == 1


def test_version_switch_under_load(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "slow", sleep_model(), {"instances": {"count": 2}}, version=1)
    with run_server(repo) as srv, srv.client(timeout=120) as c:
        overlapped = False
        for old, batch in enumerate((4096, 8192, 16384), start=1):
            if _switch_while_busy(srv, c, repo, old, batch):
                overlapped = True
                break
        assert overlapped, "the old version's request always finished before the new version was READY"


def test_failed_new_version_keeps_old_serving(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model(), version=1)
    with run_server(repo) as srv, srv.client() as c:
        assert _add(c).json()["model_version"] == "1"
        write_model(repo, "add", add_model()[:150], version=2)  # truncated
        r = c.post("/v2/repository/models/add/load")
        assert r.status_code == 422 and r.headers["inhouse-error-code"] == "1001", r.text
        r = _add(c)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        idx = _index(c)
        assert idx[("add", "1")]["state"] == "READY"
        failed = idx[("add", "2")]
        assert failed["state"] == "FAILED" and failed["code"] == 1001
        assert "not a readable ONNX model" in failed["reason"]
        assert not c.get("/v2/models/add/versions/2/ready").json()["ready"]
        # fixing the file and loading again switches to v2
        write_model(repo, "add", add_model(scale=3.0), version=2)
        assert c.post("/v2/repository/models/add/load").status_code == 200
        r = _add(c)
        assert r.json()["model_version"] == "2" and r.json()["outputs"][0]["data"] == [3.0] * 4
        srv.call(srv.server.manager.settle())
        idx = _index(c)
        assert idx[("add", "2")]["state"] == "READY" and idx[("add", "1")]["state"] == "UNLOADED"
        # a broken model.yaml on reload: the model keeps serving, the index shows why
        (repo / "add" / "model.yaml").write_text("name: add\nbatching: {max_batch_sise: 2}\n")
        r = c.post("/v2/repository/models/add/load")
        assert r.status_code == 422 and r.headers["inhouse-error-code"] == "1005"
        assert _add(c).status_code == 200
        assert "max_batch_sise" in _index(c)[("add", None)]["reason"]


@pytest.mark.parametrize(("policy", "serving"), [
    ({"policy": "latest"}, ["3"]),
    ({"policy": "latest", "keep": 2}, ["3", "2"]),
    ({"policy": "all"}, ["3", "2", "1"]),
    ({"policy": "specific", "versions": [1, 3]}, ["3", "1"]),
])
def test_version_policies(tmp_path: Path, policy: dict[str, Any], serving: list[str]) -> None:
    repo = tmp_path / "models"
    for v in (1, 2, 3):
        write_model(repo, "add", add_model(scale=float(v)), {"versions": policy}, version=v)
    with run_server(repo) as srv, srv.client() as c:
        assert c.get("/v2/models/add").json()["versions"] == serving
        for v in ("1", "2", "3"):
            r = _add(c, v)
            if v in serving:
                assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [float(v)] * 4
            else:
                assert r.status_code == 404 and r.headers["inhouse-error-code"] == "1002"
        assert _add(c).json()["model_version"] == serving[0]  # no version: the newest serving one



def test_specific_policy_naming_missing_version(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model(), {"versions": {"policy": "specific", "versions": [1, 5]}})
    write_model(repo, "mlp", mlp_model())
    with run_server(repo) as srv, srv.client() as c:
        entry = _index(c)[("add", None)]
        assert entry["state"] == "FAILED" and entry["code"] == 1005 and "[5]" in entry["reason"]
        assert c.get("/v2/models/mlp/ready").status_code == 200



def _place(repo: Path, name: str, onnx_bytes: bytes, version: int = 1) -> None:
    """Write a model folder elsewhere and move it in, as a deployment tool would."""
    staging = repo.parent / f".staging-{name}-{version}"
    write_model(staging, name, onnx_bytes, version=version)
    target = repo / name
    if target.exists():
        shutil.move(str(staging / name / str(version)), str(target / str(version)))
    else:
        shutil.move(str(staging / name), str(target))
    shutil.rmtree(staging, ignore_errors=True)


def test_polling_follows_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    with run_server(repo, poll=True, poll_interval_s=0.3) as srv, srv.client() as c:
        assert _add(c).json()["outputs"][0]["data"] == [1.0] * 4
        # a new model appears → loaded
        _place(repo, "mlp", mlp_model())
        _wait_for(lambda: c.get("/v2/models/mlp/ready").status_code == 200, what="mlp to be loaded")
        # a version's file changes → reloaded
        time.sleep(0.05)  # a distinct mtime even on coarse-grained filesystems
        tmp = repo / "add" / "1" / "model.onnx.tmp"
        tmp.write_bytes(add_model(scale=5.0))
        tmp.replace(repo / "add" / "1" / "model.onnx")
        _wait_for(lambda: _add(c).json()["outputs"][0]["data"] == [5.0] * 4, what="add v1 to reload")
        # a new version → traffic switches to it
        _place(repo, "add", add_model(scale=7.0), version=2)
        _wait_for(lambda: _add(c).json().get("model_version") == "2", what="add v2")
        assert _add(c).json()["outputs"][0]["data"] == [7.0] * 4
        # a broken model appears → FAILED in the index, the rest keep serving
        (repo / "broken").mkdir()
        (repo / "broken" / "model.yaml").write_text("name: broken\n")
        _wait_for(lambda: _index(c).get(("broken", None), {}).get("state") == "FAILED", what="broken FAILED")
        # an explicit unload sticks while the files stay as they are...
        assert c.post("/v2/repository/models/mlp/unload").status_code == 200
        time.sleep(1.0)  # three poll intervals
        assert c.get("/v2/models/mlp/ready").status_code == 503
        # ...and new files for it are deployed, so it serves again
        _place(repo, "mlp", mlp_model(seed=4), version=2)
        _wait_for(lambda: c.get("/v2/models/mlp/versions/2/ready").status_code == 200, what="mlp v2")
        # a model folder is removed → unloaded
        shutil.rmtree(repo / "mlp")
        _wait_for(lambda: c.get("/v2/models/mlp/ready").status_code == 404, what="mlp to be unloaded")
        _wait_for(lambda: not any(name == "mlp" for name, _ in _index(c)), what="mlp to leave the index")
        assert _add(c).status_code == 200


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_unload_releases_memory(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    # 16 MB of weights: a leak of one copy, let alone one per cycle, would be obvious
    write_model(repo, "big", mlp_model(features=1024, hidden=4096, classes=8))
    weights = 1024 * 4096 * 4
    body = {"inputs": [{"name": "features", "shape": [1, 1024], "datatype": "FP32", "data": [0.1] * 1024}]}
    with run_server(repo, load="none") as srv, srv.client() as c:
        samples = []
        for _ in range(20):
            assert c.post("/v2/repository/models/big/load").status_code == 200
            assert c.post("/v2/models/big/infer", json=body).status_code == 200
            assert c.post("/v2/repository/models/big/unload").status_code == 200
            srv.call(srv.server.manager.settle())
            samples.append(_rss())
        growth = samples[-1] - samples[0]
        # one retained copy would be 16 MB, 20 leaked copies 320 MB; allow allocator noise
        assert growth < weights // 4, f"RSS grew by {growth / 1e6:.1f} MB over 20 cycles: {samples}"


def test_start_up_load_modes(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    write_model(repo, "mlp", mlp_model())
    with run_server(repo, load="mlp", poll=True, poll_interval_s=0.2) as srv, srv.client() as c:
        time.sleep(0.6)  # polling must not load what --load left out
        assert c.get("/v2/models/mlp/ready").status_code == 200
        assert c.get("/v2/models/add/ready").status_code == 503
        assert _index(c)[("add", None)]["state"] == "UNLOADED"
        _place(repo, "new", add_model())  # but a model that appears later is loaded
        _wait_for(lambda: c.get("/v2/models/new/ready").status_code == 200, what="new model")
    with run_server(repo, load="none") as srv, srv.client() as c:
        assert c.get("/v2/health/ready").status_code == 200
        assert all(e["state"] == "UNLOADED" for e in _index(c).values())
