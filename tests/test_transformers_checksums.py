"""``files.sha256`` for a plaintext Hugging Face folder (tiny random Qwen2 chat model in the version
folder): every listed file is verified before transformers reads any of it, so an altered file is
1004 and the version FAILED; right hashes load READY."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import run_server

pytestmark = pytest.mark.timeout(300)


def _hf_model(repo: Path, name: str, source: Path) -> Path:
    """The HF folder copied into version 1, every file listed in files.sha256 with its hash."""
    mdir = repo / name
    shutil.copytree(source, mdir / "1")
    sums = {f"1/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((mdir / "1").iterdir())}
    spec = {"name": name, "backend": "transformers", "task": "chat", "max_model_len": 256,
            "engine": {"max_num_seqs": 2}, "files": {"sha256": sums}}
    (mdir / "model.yaml").write_text(yaml.safe_dump(spec))
    return mdir


def _load(srv: Any, name: str) -> tuple[int, str, str, dict[str, Any]]:
    with srv.client() as c:
        r = c.post(f"/v2/repository/models/{name}/load")
        index = {m["name"]: m for m in c.post("/v2/repository/index", json={}).json()}
    return r.status_code, r.headers.get("inhouse-error-code", ""), r.text, index[name]


def test_plaintext_transformers_checksums(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    repo = tmp_path / "models"
    good = _hf_model(repo, "good", llm_models["qwen2"])
    flipped = _hf_model(repo, "flipped", llm_models["qwen2"])
    weights = flipped / "1" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # inside the last tensor's data: transformers would load it without complaint
    weights.write_bytes(bytes(blob))
    missing = _hf_model(repo, "missing", llm_models["qwen2"])
    (missing / "1" / "generation_config.json").unlink()
    assert "1/model.safetensors" in yaml.safe_load((good / "model.yaml").read_text())["files"]["sha256"]

    with run_server(repo, load="none") as srv:
        status, code, text, entry = _load(srv, "flipped")
        assert (status, code) == (422, "1004"), text
        assert "model.safetensors" in text and "Checksum mismatch" in text
        assert entry["state"] == "FAILED" and "Checksum mismatch" in entry["reason"], entry
        status, code, text, entry = _load(srv, "missing")
        assert (status, code) == (422, "1005") and "generation_config.json" in text, text
        status, code, text, entry = _load(srv, "good")
        assert status == 200 and entry["state"] == "READY", text
