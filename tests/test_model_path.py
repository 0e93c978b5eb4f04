"""``MODEL_PATH`` / ``inhouse serve --model``: one model served without a repository, from a
model folder, a bare version folder or a single .onnx file, with real ``inhouse serve``
subprocesses; a missing path is one clear start-up error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from models import add_model

INHOUSE = [sys.executable, "-c", "from inhouse.cli import main; main()"]
ADD_BODY = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                       {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}


def _env(tmp_path: Path, model_path: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INHOUSE_") and k != "MODEL_PATH"}
    env["INHOUSE_LOG_FORMAT"] = "json"
    env["INHOUSE_WORKERS"] = "1"  # the tests are not about workers
    env["HOME"] = str(tmp_path)  # never touch the real user data folder
    if model_path is not None:
        env["MODEL_PATH"] = str(model_path)
    return env


def _start(tmp_path: Path, tag: str, model_path: Path | None, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / f"{tag}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*INHOUSE, "serve", "--data-dir", str(tmp_path / f"data-{tag}"), "--http-port", "0",
                                 "--grpc-port", "0", *args], env=_env(tmp_path, model_path),
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


@contextmanager
def _ready(proc: subprocess.Popen[bytes], log_path: Path) -> Iterator[httpx.Client]:
    try:
        url = None
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            for line in log_path.read_text().splitlines():
                if line.startswith("{"):
                    doc = json.loads(line)
                    url = doc.get("url", url) if doc.get("msg") == "listening" else url
                    ready = ready or doc.get("msg") == "ready"
            time.sleep(0.1)
        assert ready and url is not None and proc.poll() is None, log_path.read_text()
        with httpx.Client(base_url=url, timeout=30) as c:
            yield c
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert "Traceback" not in log_path.read_text()


def _names(c: httpx.Client) -> list[str]:
    return sorted({e["name"] for e in c.post("/v2/repository/index").json()})


def test_model_path_serves_a_folder_a_version_folder_and_a_single_file(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"  # a model folder whose spec names the model
    (bundle / "1").mkdir(parents=True)
    (bundle / "1" / "model.onnx").write_bytes(add_model())
    (bundle / "model_spec.yaml").write_text(yaml.safe_dump({"name": "scorer", "format": "ONNX"}))
    version_dir = tmp_path / "summer" / "1"  # a bare version folder: named by its model folder
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(add_model(scale=2.0))
    single = tmp_path / "files" / "adder.onnx"  # one file among others
    single.parent.mkdir()
    single.write_bytes(add_model(scale=3.0))
    (single.parent / "notes.txt").write_text("not a model")
    procs = [_start(tmp_path, "folder", bundle), _start(tmp_path, "version", None, "--model", str(version_dir)),
             _start(tmp_path, "file", single)]
    expected = [("scorer", 1.0), ("summer", 2.0), ("adder", 3.0)]
    for (proc, log_path), (name, scale) in zip(procs, expected, strict=True):
        with _ready(proc, log_path) as c:
            assert _names(c) == [name]  # that model only: no demo repository
            r = c.post(f"/v2/models/{name}/infer", json=ADD_BODY)
            assert r.status_code == 200, r.text
            assert r.json()["outputs"][0]["data"] == [scale * (x + 1) for x in (1, 2, 3, 4)]
            assert c.get(f"/v2/models/{name}/ready").status_code == 200
        assert proc.returncode == 0
    assert not (tmp_path / "data-file" / "demo").exists()


def test_a_missing_or_unusable_model_path_is_a_clear_start_up_error(tmp_path: Path) -> None:
    text_file = tmp_path / "model.txt"
    text_file.write_text("hello")
    missing = subprocess.Popen([*INHOUSE, "serve", "--http-port", "0", "--grpc-port", "0"],
                               env=_env(tmp_path, tmp_path / "nope"), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    not_onnx = subprocess.Popen([*INHOUSE, "serve", "--http-port", "0", "--grpc-port", "0", "--model", str(text_file)],
                                env=_env(tmp_path, None), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for proc, fragments in ((missing, ("MODEL_PATH", str(tmp_path / "nope"), "does not exist")),
                            (not_onnx, ("MODEL_PATH / --model", "not an .onnx model"))):
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 1, stderr
        assert "Traceback" not in stderr, stderr
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, stderr
        for f in fragments:
            assert f in errors[0], (f, errors[0])


def test_an_explicit_repo_wins_over_an_ambient_model_path(tmp_path: Path) -> None:
    """MODEL_PATH is a common variable name other tools set (benchmark harnesses, other servers'
    containers): ``--repo`` on the command line serves the repository, not that path."""
    repo = tmp_path / "repo"
    (repo / "adder" / "1").mkdir(parents=True)
    (repo / "adder" / "1" / "model.onnx").write_bytes(add_model())
    stray = tmp_path / "stray.onnx"
    stray.write_bytes(add_model(scale=5.0))
    proc, log_path = _start(tmp_path, "repo", stray, "--repo", str(repo))
    with _ready(proc, log_path) as c:
        assert _names(c) == ["adder"]
        assert c.post("/v2/models/adder/infer", json=ADD_BODY).json()["outputs"][0]["data"] == [2, 3, 4, 5]
