"""A model pool that grows under load and shrinks when idle (``instances: {init_size, max_size,
idle_s}``), against a real server: the gate model holds every call, so the test decides when
all instances are busy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer, run_server, wait_until
from gate_backend import GATES, Gate
from inhouse.core.scheduling import DynamicBatcher


def _write(repo: Path, name: str, instances: dict[str, object]) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "model.yaml").write_text(yaml.safe_dump({
        "name": name, "backend": "gate", "batching": {"max_batch_size": 0}, "instances": instances}))


def _pool(srv: RunningServer, name: str) -> DynamicBatcher:
    sched = srv.server.manager.resolve(name).scheduler
    assert isinstance(sched, DynamicBatcher)
    return sched


def _gauge(c: httpx.Client, name: str) -> float:
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "inhouse_model_instances" and sample.labels.get("model") == name:
                return sample.value
    raise AssertionError(f"no inhouse_model_instances sample for {name}")


def _config_count(c: httpx.Client, name: str) -> int:
    group = c.get(f"/v2/models/{name}/config").json()["instance_group"]
    assert len(group) == 1 and group[0]["kind"] == "KIND_CPU"
    return int(group[0]["count"])


def _send(srv: RunningServer, name: str, n: int) -> tuple[list[threading.Thread], list[int]]:
    codes: list[int] = []

    def one(i: int) -> None:
        with srv.client(timeout=60) as c:
            codes.append(c.post(f"/v2/models/{name}/infer", json={"inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [i, i]}]}).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, codes


def test_pool_grows_to_max_size_under_load_and_shrinks_to_init_size_when_idle(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    _write(repo, "pool", {"init_size": 1, "max_size": 3, "idle_s": 0.3})
    _write(repo, "fixedpool", {"count": 1})
    GATES["pool"] = gate = Gate()
    GATES["fixedpool"] = fixed_gate = Gate()
    gate.hold()
    fixed_gate.hold()
    threads: list[threading.Thread] = []
    try:
        with run_server(repo) as srv, srv.client() as c:
            pool = _pool(srv, "pool")
            assert pool.instance_count == 1 and _gauge(c, "pool") == 1
            threads, codes = _send(srv, "pool", 6)
            fixed_threads, fixed_codes = _send(srv, "fixedpool", 3)
            threads += fixed_threads
            # every instance busy with requests waiting: one more instance at a time, up to max_size
            wait_until(lambda: pool.instance_count == 3, timeout=10)
            assert _gauge(c, "pool") == 3
            assert _config_count(c, "pool") == 3  # Triton's layout tells the instances running, too
            time.sleep(0.4)
            assert pool.instance_count == 3  # never past max_size
            assert _pool(srv, "fixedpool").instance_count == 1  # count is a fixed pool
            gate.open.set()
            fixed_gate.open.set()
            for t in threads:
                t.join(30)
            assert codes == [200] * 6 and fixed_codes == [200] * 3
            # idle: back to init_size, one instance per idle_s
            wait_until(lambda: pool.instance_count == 1, timeout=10)
            assert _gauge(c, "pool") == 1 and _config_count(c, "pool") == 1
            r = c.post("/v2/models/pool/infer", json={"inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2, 4]
    finally:
        gate.open.set()
        fixed_gate.open.set()
        for t in threads:
            t.join(30)


def test_contradictory_pool_sizes_fail_the_load_with_1005(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    _write(repo, "both", {"count": 2, "init_size": 1})
    _write(repo, "upside", {"init_size": 3, "max_size": 2})
    _write(repo, "neveridle", {"init_size": 1, "max_size": 2, "idle_s": 0})
    with run_server(repo, load="none") as srv, srv.client() as c:
        r = c.post("/v2/repository/models/both/load")
        assert r.status_code == 422 and "1005" in r.text and "contradicts init_size" in r.text
        r = c.post("/v2/repository/models/upside/load")
        assert r.status_code == 422 and "max_size 2 is smaller than init_size 3" in r.text
        r = c.post("/v2/repository/models/neveridle/load")
        assert r.status_code == 422 and "instances.idle_s" in r.text
