"""Models on Ray Serve: a real two-node Ray cluster (a head and a second node, separate processes
on loopback, started here with ``ray start`` and stopped by process at the end) and a real inhouse
server in front of it (``ray: {address}``). Replicas run inhouse's ONNX backend; clients use the
v2 REST and gRPC front door with keys and audit as usual."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

# read by Ray at import: a Ray call after the server left the cluster must not start a local Ray
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
pytest.importorskip("ray", reason="could not import 'ray' (pip install 'inhouse[ray]')")

import onnxruntime as ort
import tritonclient.grpc as tgrpc

import inhouse
from conftest import RunningServer, run_server, wait_until
from inhouse.core.ray_serve import deployment_options, placed_on_ray
from inhouse.core.spec import ModelSpec
from inhouse.errors import ModelSpecError
from inhouse.security.audit import AuditLog
from inhouse.security.keys import KeyStore
from models import mlp_model, sleep_model, write_model

RAY = str(Path(sys.executable).with_name("ray"))
MLP = {"ray": {"replicas": 2, "num_cpus": 0.5, "max_replicas_per_node": 1}}
AUTO = {"ray": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 2,
                                                  "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                                                  "downscale_delay_s": 2}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ray_env(marker: str) -> dict[str, str]:
    src = str(Path(inhouse.__file__).parents[1])  # replicas import this inhouse
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{src}:{path}" if path else src, "RAY_USAGE_STATS_ENABLED": "0",
            "INHOUSE_TEST_RAY_CLUSTER": marker}


def _cluster_pids(marker: str) -> list[int]:
    """Every process of this test's cluster (Ray's own names do not tell clusters apart, and
    ``ray stop`` would stop any Ray on the machine): each inherits the marker in its environment,
    or, where a process title overwrote that, writes its logs under the cluster's temp folder."""
    needle = f"INHOUSE_TEST_RAY_CLUSTER={marker}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            mine = needle in (proc / "environ").read_bytes().split(b"\0") or any(
                _link(fd).startswith(marker + "/") for fd in (proc / "fd").iterdir())
        except OSError:
            continue
        if mine:
            pids.append(int(proc.name))
    return pids


def _link(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile
        return ""


def _stop_cluster(marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _cluster_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        end = time.monotonic() + wait
        while _cluster_pids(marker) and time.monotonic() < end:
            time.sleep(0.1)
    leaked = _cluster_pids(marker)
    assert not leaked, f"Ray processes left running: {leaked}"


def _node_args(temp: str) -> list[str]:
    # small on purpose: the machine is shared; no dashboard
    return ["--num-cpus", "2", "--object-store-memory", str(80 * 2**20), "--node-ip-address", "127.0.0.1",
            "--disable-usage-stats", "--temp-dir", temp, "--dashboard-agent-listen-port", str(_free_port()),
            "--metrics-export-port", str(_free_port())]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head node and a second node, each its own set of processes, all stopped at the end."""
    temp = tempfile.mkdtemp(prefix="ihray", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    env = _ray_env(temp)
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--ray-client-server-port", str(_free_port()), *_node_args(temp)],
                       env=env, check=True, capture_output=True, timeout=90)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *_node_args(temp)],
                       env=env, check=True, capture_output=True, timeout=90)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


class Keys:
    def __init__(self, infer: str, admin: str, key_id: str) -> None:
        self.infer, self.admin, self.key_id = infer, admin, key_id


@pytest.fixture(scope="module")
def ray_server(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Keys, Path]]:
    base = tmp_path_factory.mktemp("rayserve")
    repo, data = base / "models", base / "data"
    repo.mkdir()
    write_model(repo, "mlp", mlp_model(), MLP)
    write_model(repo, "auto", sleep_model(), AUTO)
    store = KeyStore(data)
    infer, rec = store.create("app", ["infer"])
    admin = store.create("ops", ["admin", "infer"])[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, ray={"address": cluster}, load_timeout_s=90) as srv:
        yield srv, Keys(infer, admin, rec.key_id), data


def _replicas(model: str) -> list[int]:
    """PIDs of the Ray Serve replica processes of a model (Ray names them after the application)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(f"ray::ServeReplica:inhouse.{model}.".encode()):
            pids.append(int(proc.name))
    return sorted(pids)


def _body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _expected(x: np.ndarray, seed: int = 0) -> np.ndarray:
    sess = ort.InferenceSession(mlp_model(seed=seed), providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {"features": x})[0]
    return out


def _hammer(work: Callable[[int], None], threads: int, stop: threading.Event) -> tuple[list[int], list[str]]:
    done: list[int] = []
    errors: list[str] = []

    def run(i: int) -> None:
        while not stop.is_set():
            try:
                work(i)
                done.append(1)
            except Exception as err:  # every failure a client sees is counted
                errors.append(f"{type(err).__name__}: {err}")

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    stop.wait()
    for t in pool:
        t.join(60)
    return done, errors


def test_two_replicas_serve_rest_and_grpc_behind_keys_and_audit(ray_server: tuple[RunningServer, Keys, Path]) -> None:
    srv, keys, data = ray_server
    assert len(_replicas("mlp")) == 2  # one per node (max_replicas_per_node: 1), so both nodes serve
    x = np.random.default_rng(3).standard_normal((3, 32)).astype(np.float32)
    want = _expected(x)
    with srv.client() as c:
        meta = c.get("/v2/models/mlp", headers={"x-api-key": keys.infer}).json()
        assert meta["platform"] == "ray:onnxruntime_onnx" and meta["inputs"][0]["name"] == "features"
        assert c.post("/v2/models/mlp/infer", json=_body(x)).status_code == 401  # the front door's keys
        bad = c.post("/v2/models/mlp/infer", json=_body(x[:, :31].copy()), headers={"x-api-key": keys.infer})
        assert bad.status_code == 400 and "2005" in bad.text
    stop = threading.Event()
    clients = [httpx.Client(base_url=srv.url, timeout=30, headers={"x-api-key": keys.infer}) for _ in range(4)]
    grpcs = [tgrpc.InferenceServerClient(srv.grpc_target) for _ in range(2)]

    def rest(i: int) -> None:
        r = clients[i].post("/v2/models/mlp/infer", json=_body(x))
        r.raise_for_status()
        got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(3, 2)
        np.testing.assert_allclose(got, want, rtol=1e-5)

    def grpc(i: int) -> None:
        inp = tgrpc.InferInput("features", [3, 32], "FP32")
        inp.set_data_from_numpy(x)
        res = grpcs[i].infer("mlp", [inp], headers={"x-api-key": keys.infer})
        np.testing.assert_allclose(res.as_numpy("probabilities"), want, rtol=1e-5)

    results: dict[str, tuple[list[int], list[str]]] = {}
    runners = [threading.Thread(target=lambda: results.__setitem__("rest", _hammer(rest, 4, stop))),
               threading.Thread(target=lambda: results.__setitem__("grpc", _hammer(grpc, 2, stop)))]
    for t in runners:
        t.start()
    time.sleep(3)
    stop.set()
    for t in runners:
        t.join(90)
    for c in clients:
        c.close()
    for g in grpcs:
        g.close()
    for kind in ("rest", "grpc"):
        done, errors = results[kind]
        assert not errors, f"{kind}: {errors[:3]}"
        assert len(done) >= 20, kind
    audit = AuditLog(data)
    try:
        rows = [r for r in audit.entries() if r["model"] == "mlp" and r["key_id"] == keys.key_id]
    finally:
        audit.close()
    assert sum(r["status"] == 200 for r in rows) >= len(results["rest"][0]) + len(results["grpc"][0])
    assert any(r["code"] == 2005 for r in rows)


def test_a_killed_replica_loses_no_request_and_comes_back(ray_server: tuple[RunningServer, Keys, Path]) -> None:
    srv, keys, _ = ray_server
    before = _replicas("mlp")
    assert len(before) == 2
    x = np.ones((1, 32), np.float32)
    want = _expected(x)
    clients = [httpx.Client(base_url=srv.url, timeout=30, headers={"x-api-key": keys.infer}) for _ in range(4)]

    def rest(i: int) -> None:
        r = clients[i].post("/v2/models/mlp/infer", json=_body(x))
        r.raise_for_status()
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"], np.float32), want.ravel(), rtol=1e-5)

    stop = threading.Event()
    out: dict[str, tuple[list[int], list[str]]] = {}
    runner = threading.Thread(target=lambda: out.__setitem__("r", _hammer(rest, 4, stop)))
    runner.start()
    time.sleep(1)
    os.kill(before[0], signal.SIGKILL)  # mid-load: requests it held are sent again to the other replica
    time.sleep(3)
    stop.set()
    runner.join(90)
    for c in clients:
        c.close()
    done, errors = out["r"]
    assert not errors, errors[:3]
    assert len(done) >= 20
    wait_until(lambda: len(_replicas("mlp")) == 2 and before[0] not in _replicas("mlp"), timeout=60)
    with httpx.Client(base_url=srv.url, timeout=30, headers={"x-api-key": keys.infer}) as c:
        assert c.post("/v2/models/mlp/infer", json=_body(x)).status_code == 200


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(
        ray_server: tuple[RunningServer, Keys, Path]) -> None:
    srv, keys, _ = ray_server
    assert len(_replicas("auto")) == 1
    x = np.full((8, 512), 0.01, np.float32)
    body = {"inputs": [{"name": "x", "shape": [8, 512], "datatype": "FP32", "data": x.ravel().tolist()}]}
    clients = [httpx.Client(base_url=srv.url, timeout=30, headers={"x-api-key": keys.infer}) for _ in range(6)]

    def rest(i: int) -> None:
        clients[i].post("/v2/models/auto/infer", json=body).raise_for_status()

    stop = threading.Event()
    out: dict[str, tuple[list[int], list[str]]] = {}
    runner = threading.Thread(target=lambda: out.__setitem__("r", _hammer(rest, 6, stop)))
    runner.start()
    try:
        wait_until(lambda: len(_replicas("auto")) == 2, timeout=40)
    finally:
        stop.set()
        runner.join(90)
        for c in clients:
            c.close()
    assert not out["r"][1], out["r"][1][:3]
    wait_until(lambda: len(_replicas("auto")) == 1, timeout=45)  # downscale_delay_s: 2, then a drain


def test_version_switch_and_unload_act_on_the_deployment(ray_server: tuple[RunningServer, Keys, Path]) -> None:
    srv, keys, _ = ray_server
    repo = srv.server.repository.root
    old = _replicas("mlp")
    write_model(repo, "mlp", mlp_model(seed=1), MLP, version=2)
    x = np.ones((1, 32), np.float32)
    admin = {"x-api-key": keys.admin}
    with srv.client(headers=admin) as c:
        assert c.post("/v2/repository/models/mlp/load", headers={"x-api-key": keys.infer}).status_code == 403
        assert c.post("/v2/repository/models/mlp/load").status_code == 200
        r = c.post("/v2/models/mlp/infer", json=_body(x))
        assert r.json()["model_version"] == "2"
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"], np.float32),
                                   _expected(x, seed=1).ravel(), rtol=1e-5)
        wait_until(lambda: len(_replicas("mlp")) == 2 and not set(old) & set(_replicas("mlp")), timeout=30)
        assert c.post("/v2/repository/models/mlp/unload").status_code == 200
        wait_until(lambda: not _replicas("mlp"), timeout=30)
        gone = c.post("/v2/models/mlp/infer", json=_body(x))
        assert gone.status_code == 503 and "1002" in gone.text


def test_placement_rules_and_deployment_options() -> None:
    """Which models go to Ray, and the Serve options a ray: block becomes (no cluster needed)."""
    plain = ModelSpec(name="m")
    assert placed_on_ray(plain) and deployment_options(plain)["num_replicas"] == 1
    assert not placed_on_ray(ModelSpec(name="m", ray={"enabled": False}))
    assert not placed_on_ray(ModelSpec(name="llm", backend="transformers", task="chat"))  # stays in process
    with pytest.raises(ModelSpecError, match=r"ray\.enabled: false"):
        placed_on_ray(ModelSpec(name="llm", backend="transformers", task="chat", ray={"replicas": 2}))
    with pytest.raises(ModelSpecError, match="encrypted"):
        placed_on_ray(ModelSpec(name="m", encryption={}, ray={}))
    opts = deployment_options(ModelSpec.model_validate({"name": "m", **AUTO}))
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 2
    assert opts["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0}
    with pytest.raises(ValueError, match="min_replicas"):
        ModelSpec.model_validate({"name": "m", "ray": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})
