"""The response cache against a real server: in memory (keys, audit and rate limits still apply
to hits; opt-in per model; TTL; unload) and in a real redis-server started by the test (hits,
misses, TTL expiry, tenant isolation, invalidation on a version switch, Redis killed mid-run)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from conftest import run_server, wait_until
from inhouse.security.audit import AuditLog
from inhouse.security.keys import KeyStore
from models import add_model, mlp_model, write_model
from redis_fixture import RedisServer


def _body(value: float) -> dict[str, Any]:
    x = np.full(4, value, np.float32).tolist()
    return {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": x},
                       {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": x}]}


def _stats(c: httpx.Client, model: str, **headers: str) -> tuple[int, int, int]:
    """(cache hits, cache misses, backend executions) of the model's serving version."""
    r = c.get(f"/v2/models/{model}/stats", headers=headers)
    assert r.status_code == 200, r.text
    s = r.json()["model_stats"][0]
    return s["inference_stats"]["cache_hit"]["count"], s["inference_stats"]["cache_miss"]["count"], \
        s["execution_count"]


def _infer(c: httpx.Client, model: str, value: float, **headers: str) -> httpx.Response:
    r = c.post(f"/v2/models/{model}/infer", json=_body(value), headers=headers)
    return r


def _repo(tmp_path: Path, cache: dict[str, Any] | None) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    spec: dict[str, Any] = {"inputs": [{"name": "a", "dtype": "FP32", "shape": [-1, 4]},
                                       {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]}
    if cache is not None:
        spec["response_cache"] = cache
    write_model(root, "add", add_model(), spec)
    write_model(root, "mlp", mlp_model())
    return root


def test_memory_cache_keys_audit_rate_limits(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"enabled": True})
    data = tmp_path / "data"
    store = KeyStore(data)
    a = store.create("app-a", ["infer", "metrics"])[0]
    b = store.create("app-b", ["infer"])[0]
    slow = store.create("app-slow", ["infer"], rate="2/minute")[0]
    admin = store.create("ops", ["admin", "infer", "metrics"])[0]
    store.close()
    ha, hb, hs, hadmin = ({"authorization": f"Bearer {k}"} for k in (a, b, slow, admin))
    with run_server(repo, auth=True, data_dir=data, load="add,mlp") as srv, srv.client() as c:
        first = _infer(c, "add", 1.0, **ha)
        assert first.status_code == 200 and first.json()["outputs"][0]["data"] == [2.0] * 4
        again = _infer(c, "add", 1.0, **ha)
        assert again.status_code == 200 and again.json()["outputs"] == first.json()["outputs"]
        assert _stats(c, "add", **hadmin) == (1, 1, 1)  # the second answer came from the cache
        # another key's identical request is its own entry
        assert _infer(c, "add", 1.0, **hb).status_code == 200
        assert _stats(c, "add", **hadmin) == (1, 2, 2)
        # the cache never skips the key check: no key, a bad key, still refused
        assert _infer(c, "add", 1.0).status_code == 401
        assert _infer(c, "add", 1.0, authorization="Bearer nope").status_code == 401
        # Cache-Control: no-cache goes to the model without a lookup
        assert _infer(c, "add", 1.0, **ha, **{"cache-control": "no-cache"}).status_code == 200
        assert _stats(c, "add", **hadmin) == (1, 2, 3)
        # a rate-limited key stays limited when its answer is cached
        codes = [_infer(c, "add", 1.0, **hs).status_code for _ in range(3)]
        assert codes == [200, 200, 429], codes
        assert _stats(c, "add", **hadmin) == (2, 3, 4)
        # a model that did not opt in is never looked up
        x = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
        for _ in range(2):
            assert c.post("/v2/models/mlp/infer", json=x, headers=ha).status_code == 200
        assert _stats(c, "mlp", **hadmin) == (0, 0, 2)
        metrics = c.get("/metrics", headers=ha).text
        assert 'inhouse_response_cache_lookups_total{model="add",result="hit",version="1"} 2.0' in metrics
        # unloading drops the model's entries: after a reload the same request is a miss
        assert c.post("/v2/repository/models/add/unload", headers=hadmin).status_code == 200
        assert c.post("/v2/repository/models/add/load", headers=hadmin).status_code == 200
        assert _infer(c, "add", 1.0, **ha).status_code == 200
        assert _stats(c, "add", **hadmin) == (0, 1, 1)
    # every answer, cached or not, has its audit entry
    log = AuditLog(data)
    try:
        infers = [e for e in log.entries() if e.get("action") == "infer" and e.get("model") == "add"]
    finally:
        log.close()
    assert [e.get("status") for e in infers] == [200, 200, 200, 401, 401, 200, 200, 200, 429, 200]


def test_memory_cache_ttl_and_server_wide_switch(tmp_path: Path) -> None:
    repo = _repo(tmp_path, {"ttl_s": 0.4})  # the server-wide switch turns it on; the model sets the TTL
    with run_server(repo, cache={"enabled": True}, load="add,mlp") as srv, srv.client() as c:
        assert _infer(c, "add", 2.0).status_code == 200
        assert _infer(c, "add", 2.0).status_code == 200
        assert _stats(c, "add") == (1, 1, 1)
        time.sleep(0.5)
        assert _infer(c, "add", 2.0).status_code == 200
        assert _stats(c, "add") == (1, 2, 2)  # expired: computed again
        # a different input is a different entry; the model's own opt-out wins over the server's switch
        assert _infer(c, "add", 3.0).json()["outputs"][0]["data"] == [6.0] * 4
        assert _stats(c, "add") == (1, 3, 3)
        # gRPC shares the entries: the same tensors are the same request, whatever carried them
        import tritonclient.grpc as grpcclient

        g = grpcclient.InferenceServerClient(srv.grpc_target)
        inputs = [grpcclient.InferInput(n, [1, 4], "FP32") for n in ("a", "b")]
        for i in inputs:
            i.set_data_from_numpy(np.full((1, 4), 3.0, np.float32))
        assert g.infer("add", inputs).as_numpy("out").tolist() == [[6.0] * 4]
        assert _stats(c, "add") == (2, 3, 3)
        assert g.infer("add", inputs, headers={"cache-control": "no-cache"}).as_numpy("out").tolist() == [[6.0] * 4]
        assert _stats(c, "add") == (2, 3, 4)
        g.close()
    off = tmp_path / "off"
    off.mkdir()
    shutil.copytree(repo / "add", off / "add")
    (off / "add" / "model.yaml").write_text((off / "add" / "model.yaml").read_text().replace(
        "ttl_s: 0.4", "enabled: false"))
    with run_server(off, cache={"enabled": True}, data_dir=tmp_path / "d2") as srv, srv.client() as c:
        for _ in range(2):
            assert _infer(c, "add", 2.0).status_code == 200
        assert _stats(c, "add") == (0, 0, 2)


def _redis_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match="inhouse:rc:*"))
    finally:
        client.close()


def test_redis_cache(tmp_path: Path, redis_server: RedisServer) -> None:
    repo = _repo(tmp_path, {"enabled": True, "ttl_s": 0.6})
    # add: its own TTL of 0.6 s; mlp: the server-wide switch and TTL
    with run_server(repo, cache={"redis_url": redis_server.url, "enabled": True, "ttl_s": 60},
                    load="add,mlp") as srv, srv.client() as c:
        k1, k2 = {"x-api-key": "tenant-one"}, {"x-api-key": "tenant-two"}  # auth off: still one tenant per key
        assert _infer(c, "add", 1.0, **k1).status_code == 200
        assert _infer(c, "add", 1.0, **k1).json()["outputs"][0]["data"] == [2.0] * 4
        assert _stats(c, "add") == (1, 1, 1)
        assert len(_redis_keys(redis_server.url)) == 1
        assert _infer(c, "add", 1.0, **k2).status_code == 200  # tenant isolation
        assert _stats(c, "add") == (1, 2, 2)
        assert len(_redis_keys(redis_server.url)) == 2
        time.sleep(0.7)  # Redis expires the entries
        assert _redis_keys(redis_server.url) == []
        assert _infer(c, "add", 1.0, **k1).status_code == 200
        assert _stats(c, "add") == (1, 3, 3)

        # a version switch takes the old version's entries out of Redis
        write_model(repo, "add", add_model(scale=10.0), version=2)
        assert c.post("/v2/repository/models/add/load").status_code == 200
        wait_until(lambda: _redis_keys(redis_server.url) == [])
        assert _infer(c, "add", 1.0, **k1).json()["outputs"][0]["data"] == [20.0] * 4
        assert _infer(c, "add", 1.0, **k1).json()["outputs"][0]["data"] == [20.0] * 4
        assert _stats(c, "add") == (1, 1, 1)
        # and switching back to version 1 (same files) finds nothing stale
        shutil.rmtree(repo / "add" / "2")
        assert c.post("/v2/repository/models/add/load").status_code == 200
        wait_until(lambda: _redis_keys(redis_server.url) == [])
        assert _infer(c, "add", 1.0, **k1).json()["outputs"][0]["data"] == [2.0] * 4
        assert _stats(c, "add") == (0, 1, 1)

        # Redis goes away mid-run: requests are still answered, uncached, and the outage is counted
        redis_server.kill()
        for _ in range(3):
            r = _infer(c, "add", 1.0, **k1)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0] * 4
        metrics = c.get("/metrics").text
        assert 'inhouse_response_cache_errors_total{store="redis"}' in metrics
        # and when it comes back, answers are cached again (a failed store is retried after a second)
        redis_server.start()
        time.sleep(1.1)

        def cached_again() -> bool:
            _infer(c, "add", 1.0, **k1)
            return _stats(c, "add")[0] >= 1

        wait_until(cached_again, timeout=5)
        x = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
        assert c.post("/v2/models/mlp/infer", json=x).status_code == 200
        mlp_keys = set(_redis_keys(redis_server.url))
    # a server shutting down is no unload: the shared store keeps its entries for other processes
    assert mlp_keys and mlp_keys <= set(_redis_keys(redis_server.url))


def test_memory_store_bounds_and_expiry() -> None:
    import asyncio

    from inhouse.core.response_cache import MemoryStore

    now = [0.0]
    store = MemoryStore(max_entries=3, max_bytes=10, clock=lambda: now[0])

    async def run() -> None:
        for k in "abc":
            await store.put(k, b"xx", 5)
        assert await store.get("a") == b"xx"  # a is now the most recently used
        await store.put("d", b"xx", 5)  # over 3 entries: the least recently used (b) goes
        assert [await store.get(k) for k in "abcd"] == [b"xx", None, b"xx", b"xx"]
        await store.put("e", b"1234567", 5)  # over 10 bytes: LRU entries go until it fits
        assert len(store) == 2 and await store.get("e") == b"1234567"
        await store.put("huge", b"x" * 11, 5)  # larger than the whole budget: not stored
        assert await store.get("huge") is None and await store.get("e") == b"1234567"
        now[0] = 5.0  # the TTL has passed
        assert await store.get("e") is None and len(store) == 1
        await store.put("m:1:x", b"1", 5)
        await store.put("m:2:x", b"2", 5)
        await store.drop("m:1:")
        assert await store.get("m:1:x") is None and await store.get("m:2:x") == b"2"

    asyncio.run(run())
