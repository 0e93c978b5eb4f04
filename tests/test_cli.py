"""The ``inhouse`` command line: ``models list|load|unload`` against a real server, start-up
diagnostics, and the README's promise — ``inhouse serve`` on the demo repository, end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from conftest import RunningServer
from inhouse.cli import app
from inhouse.settings import load_settings
from models import add_model, write_model

INHOUSE = [sys.executable, "-c", "from inhouse.cli import main; main()"]


def _env(tmp_path: Path, workers: str | None = "1") -> dict[str, str]:
    """``workers`` None: the default (one per core), as a user's ``inhouse serve`` gets it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INHOUSE_")}
    env["INHOUSE_LOG_FORMAT"] = "json"
    if workers is not None:
        env["INHOUSE_WORKERS"] = workers
    env["HOME"] = str(tmp_path)  # never touch the real user data folder
    return env


def test_models_list_load_unload(server: RunningServer) -> None:
    runner = CliRunner()
    url = ["--url", server.url]
    r = runner.invoke(app, ["models", "list", *url])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows["add"][:3] == ["add", "1", "READY"] and rows["mlp"][2] == "READY"

    r = runner.invoke(app, ["models", "unload", "mlp", *url])
    assert r.exit_code == 0 and "mlp: UNLOADED" in r.output, r.output
    with server.client() as c:
        assert c.get("/v2/models/mlp/ready").status_code == 503
    rows = {ln.split()[0]: ln.split() for ln in runner.invoke(app, ["models", "list", *url]).output.splitlines()[1:]}
    assert rows["mlp"][2] == "UNLOADED"

    r = runner.invoke(app, ["models", "load", "mlp", *url])
    assert r.exit_code == 0 and "mlp: READY (versions 1)" in r.output, r.output
    with server.client() as c:
        assert c.get("/v2/models/mlp/ready").status_code == 200


def test_models_errors(server: RunningServer, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["models", "load", "nope", "--url", server.url])
    assert r.exit_code == 1 and "HTTP 404" in r.output and "[1002]" in r.output, r.output
    r = runner.invoke(app, ["models", "unload", "nope", "--url", server.url])
    assert r.exit_code == 1 and "[1002]" in r.output
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = runner.invoke(app, ["models", "list", "--url", f"http://127.0.0.1:{port}", "--timeout", "5"])
    assert r.exit_code == 1 and "Cannot reach the inhouse server" in r.output
    # --config overrides model.yaml for one load: inline JSON or @FILE
    r = runner.invoke(app, ["models", "load", "mlp", "--url", server.url, "--config", '{"description": "tuned"}'])
    assert r.exit_code == 0, r.output
    with server.client() as c:
        assert c.get("/v2/models/mlp/config").json()["description"] == "tuned"
    override = tmp_path / "override.yaml"
    override.write_text("warmup:\n  samples: 3\n")
    r = runner.invoke(app, ["models", "load", "mlp", "--url", server.url, "--config", f"@{override}"])
    assert r.exit_code == 0, r.output
    with server.client() as c:
        assert c.get("/v2/models/mlp/config").json()["warmup"]["samples"] == 3
    typo = '{"batching": {"max_batch_sise": 2}}'
    r = runner.invoke(app, ["models", "load", "mlp", "--url", server.url, "--config", typo])
    assert r.exit_code == 1 and "[1005]" in r.output and "did you mean 'max_batch_size'" in r.output, r.output
    r = runner.invoke(app, ["models", "load", "mlp", "--url", server.url, "--config", "[1, 2]"])
    assert r.exit_code == 1 and "must be a mapping" in r.output
    r = runner.invoke(app, ["models", "load", "mlp", "--url", server.url, "--config", f"@{tmp_path / 'nope'}"])
    assert r.exit_code == 1 and "Cannot read" in r.output
    # the URL also comes from the environment
    r = runner.invoke(app, ["models", "list"], env={"INHOUSE_URL": server.url})
    assert r.exit_code == 0 and "add" in r.output


def _serve(args: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*INHOUSE, "serve", "--grpc-port", "0", *args], env=_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _assert_one_clear_line(proc: subprocess.Popen[str], exit_code: int, *fragments: str) -> None:
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == exit_code, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    for f in fragments:
        assert f in errors[0], (f, errors[0])


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(root, "add", add_model())
    return root


def test_serve_startup_diagnostics(small_repo: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("http_prot: 1\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # started together: each pays the interpreter start-up, so overlap them
        in_use = _serve(["--repo", str(small_repo), "--http-port", str(port)], tmp_path)
        missing = _serve(["--repo", str(tmp_path / "missing"), "--http-port", "0"], tmp_path)
        bad_load = _serve(["--repo", str(small_repo), "--http-port", "0", "--load", "add,nope"], tmp_path)
        bad_config = _serve(["--repo", str(small_repo), "--config", str(bad)], tmp_path)
        _assert_one_clear_line(in_use, 1, f"127.0.0.1:{port}", "--http-port")
    _assert_one_clear_line(missing, 1, str(tmp_path / "missing"), "does not exist")
    _assert_one_clear_line(bad_load, 1, "['nope']", "models there: add")
    _assert_one_clear_line(bad_config, 2, "http_prot", "unknown setting")


def test_serve_demo_repository_end_to_end(tmp_path: Path) -> None:
    """``inhouse serve`` with no repository: the demo models, built on first start, answer."""
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*INHOUSE, "serve", "--data-dir", str(tmp_path / "data"), "--http-port", "0",
                                 "--grpc-port", "0"], env=_env(tmp_path, workers=None), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url, workers = None, 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            for line in log_path.read_text().splitlines():
                if line.startswith("{"):
                    doc = json.loads(line)
                    url = doc.get("url", url) if doc.get("msg") == "listening" else url
                    workers = int(doc["workers"]) if doc.get("msg") == "workers starting" else workers
                    # with several workers (INHOUSE_WORKERS), ready once every worker is
                    if doc.get("msg") == ("ready" if workers == 1 else "workers ready"):
                        break
            else:
                time.sleep(0.2)
                continue
            break
        assert url is not None and proc.poll() is None, log_path.read_text()
        # the default: a front end per core (the demo's models are small ONNX ones, a copy in each)
        assert workers == load_settings(None, workers="auto").worker_count(), log_path.read_text()[-2000:]
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/v2/health/ready").json() == {"ready": True}
            r = c.post("/v2/models/iris/infer", json={"inputs": [
                {"name": "features", "shape": [2, 4], "datatype": "FP32",
                 "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]})
            assert r.status_code == 200, r.text
            outputs = {o["name"]: o for o in r.json()["outputs"]}
            assert outputs["label"]["data"] == ["setosa", "virginica"]
            assert outputs["probabilities"]["shape"] == [2, 3] and outputs["probabilities"]["data"][0] > 0.9
            r = c.post("/v2/models/breast-cancer/infer", json={"inputs": [
                {"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [
                    17.99, 10.38, 122.8, 1001, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053,
                    8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6,
                    2019, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189]}]})
            assert {o["name"]: o for o in r.json()["outputs"]}["label"]["data"] == ["malignant"], r.text
            r = c.post("/v2/models/diabetes/infer", json={"inputs": [
                {"name": "features", "shape": [1, 10], "datatype": "FP32",
                 "data": [0.038, 0.05, 0.062, 0.022, -0.044, -0.035, -0.043, -0.003, 0.02, -0.018]}]})
            out = r.json()["outputs"][0]
            assert out["name"] == "progression" and 150 < out["data"][0] < 260, r.text
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, log_path.read_text()  # SIGTERM is a graceful stop
    assert "Traceback" not in log_path.read_text()
