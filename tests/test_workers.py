"""``inhouse serve --workers 2`` as a user runs it: one supervisor and two worker processes on the
same ports. Requests spread over both; a load, unload or version switch made through one worker is
served by every worker; a revoked key is refused by every worker; /metrics adds both up; the audit
chain (written by both) verifies; a killed worker is replaced with the current models; SIGTERM
drains what is in flight. The tests share one server, in this order."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from prometheus_client.parser import text_string_to_metric_families

from inhouse.protocols.proto import openclaw_model_service_pb2 as openclaw_pb
from inhouse.protocols.proto import openclaw_model_service_pb2_grpc as openclaw_grpc
from inhouse.security.keys import KeyStore
from inhouse.settings import AUTO_WORKERS_MAX, ServerSettings, SettingsError, cgroup_cpus, load_settings
from inhouse.workers.placement import start_count
from models import mlp_model, sleep_model, slow_request, write_model

CONNECTIONS = 24  # fresh connections per check: all on one of two workers by chance is 2**-23


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Workers:
    proc: subprocess.Popen[bytes]
    url: str
    grpc_target: str
    repo: Path
    data: Path
    log: Path
    admin: str
    infer: str

    def children(self) -> set[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(p) for p in path.read_text().split()}

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.admin
        return {"authorization": f"Bearer {key}"} if key else {}  # no key: a server without --auth

    def per_connection(self, method: str, path: str, key: str | None = None,
                       **kw: object) -> list[tuple[int, httpx.Response]]:
        """``path`` once on each of CONNECTIONS fresh connections, with the pid of the worker that
        answered (GET /v2 on the same connection first)."""
        out = []
        for _ in range(CONNECTIONS):
            with httpx.Client(base_url=self.url, headers=self.headers(key), timeout=30) as c:
                meta = c.get("/v2")
                assert meta.status_code == 200, meta.text
                out.append((int(meta.json()["worker"]["pid"]), c.request(method, path, **kw)))  # type: ignore[arg-type]
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples ``name`` whose labels include ``labels``, as /metrics shows them."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def wait_ready(self, count: int = 2, exclude: set[int] | frozenset[int] = frozenset()) -> set[int]:
        """Until ``count`` worker processes (none of ``exclude``) answer ready."""
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            seen: set[int] = set()
            try:
                for _ in range(CONNECTIONS):
                    with httpx.Client(base_url=self.url, headers=self.headers(), timeout=5) as c:
                        if c.get("/v2/health/ready").status_code == 200:
                            seen.add(int(c.get("/v2").json()["worker"]["pid"]))
            except httpx.TransportError:
                pass
            pids = self.children()
            if len(seen) >= count and seen <= pids and not (seen & exclude):
                return seen
            time.sleep(0.3)
        raise AssertionError(f"{count} workers never became ready:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    root = tmp_path_factory.mktemp("workers")
    repo, data = root / "models", root / "data"
    write_model(repo, "mlp", mlp_model())
    write_model(repo, "slow", sleep_model())
    write_model(root / "openclaw", "scorer", mlp_model())  # LoadModel's folder, outside the repository
    store = KeyStore(data)
    admin = store.create("admin", ["admin", "infer", "metrics"])[0]
    infer = store.create("app", ["infer"])[0]
    store.close()
    with _started(root, repo, data, ["--auth"], {"INHOUSE_DRAIN_TIMEOUT_S": "60",
                                                  "INHOUSE_MODEL_DIRS": f'["{root / "openclaw"}"]'},
                  admin, infer) as w:
        yield w


@contextmanager
def _started(root: Path, repo: Path, data: Path, args: list[str], env: dict[str, str], admin: str = "",
             infer: str = "") -> Iterator[Workers]:
    """``inhouse serve --workers 2`` on ``repo`` with ``args``, once both workers are ready; its
    log in ROOT/server.log. Killed at the end, with whatever workers it still had."""
    port, grpc_port = _free_port(), _free_port()
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--http-port", str(port),
             "--grpc-port", str(grpc_port), "--data-dir", str(data), "--workers", "2", "--log-format", "json",
             *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    w = Workers(proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", repo, data, log, admin, infer)
    try:
        w.wait_ready()
        yield w
    finally:
        left = w.children() if proc.poll() is None else set()  # read before the supervisor is gone
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _infer_body(rows: int = 1) -> dict[str, object]:
    x = np.zeros((rows, 32), np.float32)
    return {"inputs": [{"name": "features", "shape": [rows, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}


def test_requests_spread_over_worker_processes(workers: Workers) -> None:
    answers = workers.per_connection("POST", "/v2/models/mlp/infer", key=workers.infer, json=_infer_body())
    assert all(r.status_code == 200 for _, r in answers), [r.text for _, r in answers]
    pids = {pid for pid, _ in answers}
    assert len(pids) == 2 and pids == workers.children()
    assert workers.proc.pid not in pids  # the supervisor serves nothing itself


def test_metrics_are_the_sum_over_workers(workers: Workers) -> None:
    before = workers.metric("inhouse_inference_requests_total", model="mlp", version="1", outcome="success")
    answers = workers.per_connection("POST", "/v2/models/mlp/infer", key=workers.infer, json=_infer_body())
    assert len({pid for pid, _ in answers}) == 2
    client = tgrpc.InferenceServerClient(workers.grpc_target)
    for _ in range(3):  # gRPC on the same shared port
        inp = tgrpc.InferInput("features", [1, 32], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 32), np.float32))
        client.infer("mlp", [inp], headers=workers.headers(workers.infer))
    client.close()
    after = workers.metric("inhouse_inference_requests_total", model="mlp", version="1", outcome="success")
    assert after - before == CONNECTIONS + 3
    assert workers.metric("inhouse_workers") == 2
    assert workers.metric("inhouse_models", state="READY") == 2  # mlp and slow, not 4: the same in each


def test_console_figures_are_the_sum_over_workers(workers: Workers) -> None:
    """The console's live figures (``/console/api/metrics``) are the server's, whichever worker
    serves the page: every answer counts the requests both workers served."""
    answers = workers.per_connection("POST", "/v2/models/mlp/infer", key=workers.infer, json=_infer_body())
    assert len({pid for pid, _ in answers}) == 2
    total = workers.metric("inhouse_inference_requests_total")
    console = workers.per_connection("GET", "/console/api/metrics")
    assert len({pid for pid, _ in console}) == 2
    for _, r in console:
        assert r.status_code == 200, r.text
        assert r.json()["inference"]["requests"] == total, (r.json()["inference"], total)
        assert r.json()["process"]["resident_memory_bytes"] > 0


def test_revoked_key_is_refused_by_every_worker(workers: Workers) -> None:
    with httpx.Client(base_url=workers.url, headers=workers.headers(), timeout=30) as c:
        made = c.post("/v2/security/keys", json={"name": "short-lived", "scopes": ["infer"]})
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["key_id"]
    ok = workers.per_connection("POST", "/v2/models/mlp/infer", key=key, json=_infer_body())
    assert len({pid for pid, _ in ok}) == 2 and all(r.status_code == 200 for _, r in ok)  # both know it
    with httpx.Client(base_url=workers.url, headers=workers.headers(), timeout=30) as c:
        assert c.delete(f"/v2/security/keys/{key_id}").status_code == 200
    for _ in range(CONNECTIONS):
        with httpx.Client(base_url=workers.url, headers=workers.headers(key), timeout=30) as c:
            assert c.post("/v2/models/mlp/infer", json=_infer_body()).status_code == 401
    seen = {pid for pid, _ in workers.per_connection("GET", "/v2/health/live")}
    assert len(seen) == 2  # both workers took connections meanwhile, so both refused it


def test_a_key_rate_holds_for_the_server_not_per_worker(workers: Workers) -> None:
    """Rate limits are counted in a table every worker maps: a key allowed 12 requests a minute
    gets 12 in all, wherever its connections land, and both workers refuse the rest."""
    with httpx.Client(base_url=workers.url, headers=workers.headers(), timeout=30) as c:
        made = c.post("/v2/security/keys", json={"name": "metered", "scopes": ["infer"], "rate": "12/minute"})
        assert made.status_code == 201, made.text
        key = made.json()["key"]
    if time.time() % 60 > 50:  # all 12 inside one minute's window, whatever the second now is
        time.sleep(61 - time.time() % 60)
    answers = []
    for _ in range(CONNECTIONS):  # a fresh connection each: the kernel picks the worker
        with httpx.Client(base_url=workers.url, timeout=30) as c:
            r = c.post("/v2/models/mlp/infer", json=_infer_body(), headers=workers.headers(key))
            pid = int(c.get("/v2", headers=workers.headers()).json()["worker"]["pid"])  # the admin key: no rate
            answers.append((pid, r))
    codes = [r.status_code for _, r in answers]
    assert codes.count(200) == 12 and codes.count(429) == CONNECTIONS - 12, codes
    assert codes[:12] == [200] * 12  # one at a time: the 13th is the first refused
    refused_by = {pid for pid, r in answers if r.status_code == 429}
    assert len(refused_by) == 2, refused_by  # both workers saw the other's count
    assert all(r.headers.get("retry-after") for _, r in answers if r.status_code == 429)


def _index(answers: list[tuple[int, httpx.Response]], name: str) -> dict[int, list[tuple[object, str]]]:
    out: dict[int, list[tuple[object, str]]] = {}
    for pid, r in answers:
        assert r.status_code == 200, r.text
        out[pid] = sorted((e.get("version"), e["state"]) for e in r.json() if e["name"] == name)
    return out


def test_unload_load_and_version_switch_reach_every_worker(workers: Workers) -> None:
    with httpx.Client(base_url=workers.url, headers=workers.headers(), timeout=60) as c:
        r = c.post("/v2/repository/models/mlp/unload")
        assert r.status_code == 200, r.text
    ready = workers.per_connection("GET", "/v2/models/mlp/ready")
    assert len({pid for pid, _ in ready}) == 2 and all(r.status_code != 200 for _, r in ready)
    index = _index(workers.per_connection("POST", "/v2/repository/index", json={}), "mlp")
    assert len(index) == 2 and all(entries == [("1", "UNLOADED")] for entries in index.values()), index

    write_model(workers.repo, "mlp", mlp_model(seed=1), version=2)  # a new version: the switch
    with httpx.Client(base_url=workers.url, headers=workers.headers(), timeout=60) as c:
        r = c.post("/v2/repository/models/mlp/load")
        assert r.status_code == 200 and r.json()["versions"] == ["2"], r.text
    meta = workers.per_connection("GET", "/v2/models/mlp")
    assert len({pid for pid, _ in meta}) == 2
    assert all(r.status_code == 200 and r.json()["versions"] == ["2"] for _, r in meta), [r.text for _, r in meta]
    index = _index(workers.per_connection("POST", "/v2/repository/index", json={}), "mlp")
    assert len(index) == 2 and len({tuple(v) for v in index.values()}) == 1, index  # one truth

    # OpenClaw's LoadModel over gRPC: a folder under another name, served by both workers
    with grpc.insecure_channel(workers.grpc_target) as ch:
        stub = openclaw_grpc.ModelServiceStub(ch)  # type: ignore[no-untyped-call]
        folder = workers.repo.parent / "openclaw" / "scorer"
        r = stub.LoadModel(openclaw_pb.LoadModelRequest(model_name="scorer", model_path=str(folder)),
                           metadata=[("authorization", f"Bearer {workers.admin}")], timeout=60)
        assert r.success and list(r.versions) == ["1"]
    meta = workers.per_connection("GET", "/v2/models/scorer")
    assert len({pid for pid, _ in meta}) == 2 and all(r.status_code == 200 for _, r in meta)


def test_a_killed_worker_is_replaced_with_the_current_models(workers: Workers) -> None:
    victim = min(workers.children())
    os.kill(victim, signal.SIGKILL)
    pids = workers.wait_ready(exclude={victim})
    assert victim not in pids and pids == workers.children()
    # the new worker replayed the version switch: everyone serves version 2 only
    meta = workers.per_connection("GET", "/v2/models/mlp")
    assert {pid for pid, _ in meta} == pids
    assert all(r.json()["versions"] == ["2"] for _, r in meta), [r.text for _, r in meta]
    assert all(r.status_code == 200 for _, r in workers.per_connection("GET", "/v2/models/scorer"))


def test_audit_chain_holds_entries_from_every_worker(workers: Workers) -> None:
    done = subprocess.run([sys.executable, "-m", "inhouse", "audit", "verify", "--data-dir", str(workers.data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # every request above was audited, by both workers' writers, into one chain
    entries = int(re.search(r"(\d+) audit entries", done.stdout + done.stderr).group(1))  # type: ignore[union-attr]
    assert entries >= 6 * CONNECTIONS, done.stdout


def test_sigterm_drains_every_worker(workers: Workers) -> None:
    body, headers = slow_request(4096)
    headers.update(workers.headers(workers.infer))
    results: list[object] = []

    def call() -> None:
        try:
            with httpx.Client(base_url=workers.url, timeout=120) as c:  # its own connection
                results.append(c.post("/v2/models/slow/infer", content=body, headers=headers).status_code)
        except httpx.HTTPError as err:
            results.append(err)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while workers.metric("inhouse_inflight_requests", model="slow") + len(results) < 6:
        assert time.time() < deadline, f"the requests never reached the workers: {results}"
        time.sleep(0.05)
    workers.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(180)
    assert results == [200] * 6, results
    assert workers.proc.wait(90) == 0, workers.log.read_text()[-4000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{workers.url}/v2/health/live", timeout=2)


def test_workers_setting() -> None:
    assert 1 <= load_settings(None, workers="auto").worker_count() <= AUTO_WORKERS_MAX
    assert load_settings(None, workers="3").worker_count() == 3
    assert load_settings(None, workers="1").worker_count() == 1
    # the default is a front end per core (README: Worker processes)
    assert ServerSettings.model_fields["workers"].default == "auto"
    assert load_settings(None, workers="auto", ray={"address": None}).worker_count() == 1



def test_auto_workers_are_one_when_every_model_at_start_is_held_by_one(tmp_path: Path) -> None:
    """``workers: auto`` starts one process for a repository of LLMs (every model placed on one
    worker: more front ends would only add a hop per token), and one per core otherwise."""
    cores = load_settings(None, workers="auto").worker_count()
    llms = tmp_path / "llms"
    (llms / "chat" / "1").mkdir(parents=True)
    (llms / "chat" / "1" / "model.gguf").write_bytes(b"GGUF")
    (llms / "chat" / "model.yaml").write_text("name: chat\nbackend: llamacpp\ntask: chat\n")
    write_model(llms, "big", mlp_model(), {"placement": "one"})
    assert start_count(load_settings(None, workers="auto", repo=str(llms))) == 1
    assert start_count(load_settings(None, workers="3", repo=str(llms))) == 3  # a number is a number
    mixed = tmp_path / "mixed"
    shutil.copytree(llms, mixed)
    write_model(mixed, "mlp", mlp_model())
    assert start_count(load_settings(None, workers="auto", repo=str(mixed))) == cores
    # only what loads at start counts: the ONNX model left out, the LLMs alone decide
    assert start_count(load_settings(None, workers="auto", repo=str(mixed), load="chat,big")) == 1
    assert start_count(load_settings(None, workers="auto")) == cores  # the demo: small ONNX models


def test_auto_workers_follow_a_container_cpu_quota(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")  # 2.5 CPUs: three workers can use them
    assert cgroup_cpus(quota) == 3
    quota.write_text("max 100000\n")
    assert cgroup_cpus(quota) is None
    assert cgroup_cpus(tmp_path / "absent") is None
    for bad in ("0", "many"):
        with pytest.raises(SettingsError, match="workers"):
            load_settings(None, workers=bad)


def test_a_start_that_fails_in_the_workers_fails_once(tmp_path: Path) -> None:
    """A worker that cannot start (here: the repository is a file) ends the whole start with an
    error, instead of being restarted for ever."""
    not_a_folder = tmp_path / "models"
    not_a_folder.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "inhouse", "serve", "--repo", str(not_a_folder), "--http-port", "0",
         "--grpc-port", "0", "--data-dir", str(tmp_path / "data"), "--workers", "2"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "does not exist or is not a folder" in done.stderr


def test_repository_polling_is_done_once_for_every_worker(tmp_path: Path) -> None:
    """With ``--poll``, worker 0 follows the repository and applies what it finds in every worker
    through the supervisor: a model added later is served by both, a worker restarted afterwards
    serves it too (it was started with ``--load mlp``, so without the recorded change it would
    park the newcomer), and a model removed from the folder leaves every worker."""
    repo, data = tmp_path / "models", tmp_path / "data"
    write_model(repo, "mlp", mlp_model())
    with _started(tmp_path, repo, data, ["--poll", "--load", "mlp"], {"INHOUSE_POLL_INTERVAL_S": "1"}) as w:
        log = w.log

        def served_by_both(name: str, wanted: int) -> bool:
            answers = w.per_connection("GET", f"/v2/models/{name}/ready")
            return len({pid for pid, _ in answers}) == 2 and all(r.status_code == wanted for _, r in answers)

        def until(check: Any, what: str) -> None:
            deadline = time.time() + 60
            while not check():
                assert time.time() < deadline, f"{what}:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)

        write_model(repo, "late", mlp_model(seed=3))
        until(lambda: served_by_both("late", 200), "the added model was not served by both workers")
        victim = max(w.children())
        os.kill(victim, signal.SIGKILL)
        w.wait_ready(exclude={victim})
        assert served_by_both("late", 200), "the restarted worker does not serve the polled model"
        shutil.rmtree(repo / "late")
        until(lambda: served_by_both("late", 404), "the removed model is still served")
        polled = [line for line in log.read_text().splitlines() if "model removed from repository" in line]
        assert len(polled) == 1, polled  # one worker polled, not each
