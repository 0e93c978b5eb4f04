"""Load timeouts against a real server: a load running past ``load_timeout_s`` / a model's
``load.timeout_s`` fails with 1009 at once, the previous version keeps serving, and what the
load thread returns later is closed."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from conftest import run_server, wait_until
from gate_backend import GATES, Gate
from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.settings import SettingsError, load_settings
from slow_load_backend import LOAD_GATES, LoadGate


def _write(repo: Path, name: str, spec: dict[str, object], versions: tuple[int, ...] = (1,)) -> None:
    for v in versions:
        (repo / name / str(v)).mkdir(parents=True, exist_ok=True)
    (repo / name / "model.yaml").write_text(yaml.safe_dump({"name": name, **spec}))


def _infer(c: httpx.Client, name: str) -> httpx.Response:
    return c.post(f"/v2/models/{name}/infer", json={"inputs": [
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]})


def _index(c: httpx.Client) -> dict[tuple[str, str | None], dict[str, object]]:
    return {(e["name"], e.get("version")): e for e in c.post("/v2/repository/index").json()}


def test_slow_reload_fails_with_1009_and_the_old_version_keeps_serving(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    LOAD_GATES["slowload"] = gate = LoadGate()
    gate.open.set()
    _write(repo, "slowload", {"backend": "slow-load"})
    with run_server(repo, load_timeout_s=0.5) as srv, srv.client() as c:
        assert _infer(c, "slowload").status_code == 200
        gate.open.clear()
        (repo / "slowload" / "2").mkdir()
        started = time.monotonic()
        r = c.post("/v2/repository/models/slowload/load")
        assert r.status_code == 504, r.text
        assert "1009" in r.text and "0.5 s load timeout" in r.text
        assert time.monotonic() - started < 5  # failed when the timeout passed, not when the load ended
        entry = _index(c)[("slowload", "2")]
        assert entry["state"] == "FAILED" and "load timeout" in str(entry["reason"])
        ok = _infer(c, "slowload")
        assert ok.status_code == 200 and ok.json()["model_version"] == "1"
        assert gate.closed == 0
        gate.open.set()  # the load thread finishes late: what it loaded is closed, nothing leaks
        wait_until(lambda: gate.closed == 1)
        srv.call(srv.server.manager.settle())
        assert _index(c)[("slowload", "2")]["state"] == "FAILED"  # late result did not revive it
        assert _infer(c, "slowload").json()["model_version"] == "1"


def test_per_model_timeout_wins_and_grpc_load_gets_deadline_exceeded(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    LOAD_GATES["slowgrpc"] = gate = LoadGate()
    _write(repo, "slowgrpc", {"backend": "slow-load", "load": {"timeout_s": 0.3}})
    with run_server(repo, load="none", load_timeout_s=60) as srv:
        assert srv.grpc_target is not None
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slowgrpc"), timeout=20)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "1009" in str(info.value.details())
        gate.open.set()
        wait_until(lambda: gate.closed == 1)


def test_warmup_counts_toward_the_timeout_at_start_up(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    GATES["slowwarm"] = gate = Gate()
    gate.hold()  # every predict, warm-up included, blocks until the gate opens
    _write(repo, "slowwarm", {"backend": "gate", "warmup": {"samples": 1}, "load": {"timeout_s": 0.3}})
    try:
        with run_server(repo) as srv, srv.client() as c:
            assert c.get("/v2/health/ready").status_code == 200  # start-up finished despite the failure
            entry = _index(c)[("slowwarm", "1")]
            assert entry["state"] == "FAILED" and "0.3 s load timeout" in str(entry["reason"])
            r = _infer(c, "slowwarm")
            assert r.status_code == 503 and "load timeout" in r.text
    finally:
        gate.open.set()


def test_bad_timeouts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="load_timeout_s"):
        load_settings(None, load_timeout_s=0)
    repo = tmp_path / "models"
    _write(repo, "badtimeout", {"backend": "slow-load", "load": {"timeout_s": -1}})
    _write(repo, "typo", {"backend": "slow-load", "load": {"timeout": 5}})
    with run_server(repo, load="none") as srv, srv.client() as c:
        r = c.post("/v2/repository/models/badtimeout/load")
        assert r.status_code == 422 and "1005" in r.text and "load.timeout_s" in r.text
        r = c.post("/v2/repository/models/typo/load")
        assert r.status_code == 422 and "did you mean 'timeout_s'" in r.text


def test_openclaw_load_model_past_the_timeout_gets_deadline_exceeded(tmp_path: Path) -> None:
    from inhouse.protocols.proto import openclaw_model_service_pb2 as ocpb
    from inhouse.protocols.proto import openclaw_model_service_pb2_grpc as ocpb_grpc

    repo = tmp_path / "models"
    repo.mkdir()
    folder = tmp_path / "openclaw" / "slowclaw" / "v1"  # the guide's layout: a version folder with its spec
    folder.mkdir(parents=True)
    (folder / "model_spec.yaml").write_text(yaml.safe_dump({"name": "slowclaw", "backend": "slow-load"}))
    LOAD_GATES["slowclaw"] = gate = LoadGate()
    with run_server(repo, load_timeout_s=0.3, model_dirs=[tmp_path / "openclaw"]) as srv:
        assert srv.grpc_target is not None
        with grpc.insecure_channel(srv.grpc_target) as channel:
            stub = ocpb_grpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as info:
                stub.LoadModel(ocpb.LoadModelRequest(model_name="slowclaw", model_path=str(folder)), timeout=20)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert str(info.value.details()).startswith("[1009] ")
            listed = {(m.model_name, m.version): m for m in stub.ListModels(ocpb.ListModelsRequest()).models}
            assert listed[("slowclaw", "1")].state == "FAILED" and listed[("slowclaw", "1")].error_code == 1009
        gate.open.set()
        wait_until(lambda: gate.closed == 1)
