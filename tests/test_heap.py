"""The garbage collector kept off the request path: the heap is frozen when the server becomes
ready and settled again after models come and go, without keeping unloaded models alive."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import httpx

from conftest import run_server, wait_until
from inhouse.core.heap import settle
from models import mlp_model, write_model


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


def test_settle_freezes_the_live_heap_and_still_frees_cycles_that_die_later() -> None:
    try:
        node = _Node()
        ref = weakref.ref(node)
        settle()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen objects are skipped by collections: why settle unfreezes
        settle()
        assert ref() is None
    finally:
        gc.unfreeze()


def _infer(url: str, name: str) -> httpx.Response:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 32], "data": [0.5] * 32}]}
    return httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=10)


def test_server_freezes_at_ready_and_releases_unloaded_models(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "a", mlp_model())
    write_model(repo, "b", mlp_model(seed=1))
    with run_server(repo) as srv:
        heap = srv.server._heap
        assert heap is not None and heap.settled >= 1 and gc.get_freeze_count() > 0
        heap.delay_s = 0.05
        model = srv.server.manager.resolve("b").model
        ref = weakref.ref(model)
        del model
        settled = heap.settled
        r = httpx.post(f"{srv.url}/v2/repository/models/b/unload", timeout=30)
        assert r.status_code == 200, r.text
        wait_until(lambda: heap.settled > settled)
        assert ref() is None  # nothing frozen keeps the unloaded model's objects alive
        assert _infer(srv.url, "a").status_code == 200
        assert _infer(srv.url, "b").status_code == 503  # unloaded: not ready
        r = httpx.post(f"{srv.url}/v2/repository/models/b/load", timeout=30)
        assert r.status_code == 200, r.text
        wait_until(lambda: heap.settled > settled + 1)
        assert _infer(srv.url, "b").status_code == 200
    assert gc.get_freeze_count() == 0  # stopped: an embedding process collects as usual again


def test_gc_freeze_can_be_turned_off(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "a", mlp_model())
    gc.unfreeze()
    with run_server(repo, gc_freeze=False) as srv:
        assert srv.server._heap is None
        assert _infer(srv.url, "a").status_code == 200
        assert gc.get_freeze_count() == 0
