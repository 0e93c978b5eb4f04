"""Models encrypted at rest: the CLI encrypts in place, the server decrypts in memory only,
tampering or a wrong key is 1004 with nothing loaded, rotation re-encrypts safely."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.security.crypto import MAGIC, encrypt_file, is_encrypted, key_id, new_key_file, read_key_file
from models import add_model, write_model

X = np.ones((1, 4), np.float32).ravel().tolist()
INFER = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": X},
                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": X}]}


def _repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(root, "add", add_model(scale=3.0), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]},
        checksum=True)
    return root


def _encrypt(model_dir: Path, key: Path, *extra: str) -> str:
    res = CliRunner().invoke(app, ["encrypt", str(model_dir), "--key-file", str(key), *extra])
    assert res.exit_code == 0, res.output
    return res.output


def _load_code(srv: object) -> tuple[int, dict[str, str]]:
    with srv.client() as c:  # type: ignore[attr-defined]
        r = c.post("/v2/repository/models/add/load")
        return r.status_code, {"code": r.headers.get("inhouse-error-code", ""), "error": r.text}


def test_encrypt_serve_and_tamper(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    key = tmp_path / "model.key"
    plain = (repo / "add/1/model.onnx").read_bytes()
    out = _encrypt(repo / "add", key, "--new-key")
    assert "1 encrypted" in out and oct(key.stat().st_mode & 0o777) == "0o600"
    stored = (repo / "add/1/model.onnx").read_bytes()
    assert stored.startswith(MAGIC) and plain not in stored
    spec = yaml.safe_load((repo / "add/model.yaml").read_text())
    assert spec["encryption"] == {"key_id": key_id(read_key_file(key))}
    # the checksum now covers the encrypted bytes
    assert _encrypt(repo / "add", key).strip().endswith(f"1 unchanged (key id {key_id(read_key_file(key))})")

    before = set(_all_files(tmp_path))
    with run_server(repo, model_key_file=key) as srv, srv.client() as c:
        r = c.post("/v2/models/add/infer", json=INFER)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [6.0] * 4
    written = [p for p in set(_all_files(tmp_path)) - before if p.is_file() and p.stat().st_size > 0]
    assert not any(plain[:64] in p.read_bytes() for p in written)  # plaintext never reached the disk

    # no key: 1004 and not loaded
    with run_server(repo) as srv:
        status, err = _load_code(srv)
        assert status == 422 and err["code"] == "1004" and "--model-key-file" in err["error"]
    # the wrong key
    other = tmp_path / "other.key"
    new_key_file(other)
    with run_server(repo, model_key_file=other) as srv:
        assert _load_code(srv)[1]["code"] == "1004"
    # one flipped byte (checksum removed so decryption itself must catch it)
    doc = yaml.safe_load((repo / "add/model.yaml").read_text())
    doc.pop("files")
    (repo / "add/model.yaml").write_text(yaml.safe_dump(doc))
    blob = bytearray(stored)
    blob[len(blob) // 2] ^= 0x01
    (repo / "add/1/model.onnx").write_bytes(bytes(blob))
    with run_server(repo, model_key_file=key) as srv:
        status, err = _load_code(srv)
        assert status == 422 and err["code"] == "1004" and "altered" in err["error"]
        with srv.client() as c:
            assert c.get("/v2/models/add/ready").status_code == 503
    # a plaintext model swapped in for the encrypted one is refused
    (repo / "add/1/model.onnx").write_bytes(plain)
    with run_server(repo, model_key_file=key) as srv:
        status, err = _load_code(srv)
        assert err["code"] == "1004" and "plaintext" in err["error"]


def test_rotation_and_env_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo(tmp_path)
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    _encrypt(repo / "add", old, "--new-key")
    new_key_file(new)
    # a crash midway leaves files under either key; re-running finishes the job
    extra = repo / "add/1/extra.bin"
    extra.write_bytes(b"x" * 100)
    encrypt_file(extra, read_key_file(old))
    encrypt_file(extra, read_key_file(new), {key_id(read_key_file(old)): read_key_file(old)})
    out = _encrypt(repo / "add", new, "--old-key-file", str(old))
    assert "1 re-encrypted" in out and "1 unchanged" in out
    assert not list((repo / "add/1").glob(".*.tmp"))
    res = CliRunner().invoke(app, ["encrypt", str(repo / "add"), "--key-file", str(old)])
    assert res.exit_code != 0 and "does not have" in res.output  # old key alone cannot read new files
    monkeypatch.setenv("INHOUSE_MODEL_KEY", new.read_text().strip())
    with run_server(repo, load="add") as srv, srv.client() as c:
        assert c.post("/v2/models/add/infer", json=INFER).json()["outputs"][0]["data"] == [6.0] * 4
    assert is_encrypted((repo / "add/1/model.onnx").read_bytes())


def test_bad_key_file_is_a_startup_error(tmp_path: Path) -> None:
    from inhouse.server import StartupError

    bad = tmp_path / "bad.key"
    bad.write_text("too short")
    with pytest.raises(StartupError, match="256-bit"), run_server(_repo(tmp_path), model_key_file=bad):
        pass


def _all_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
