"""Encrypted Transformers models: ``inhouse encrypt`` on a Hugging Face folder (tiny random
Qwen2 chat model and BERT encoder), served from memory with the same answers as the plaintext
folder; a wrong key, a flipped byte or a plaintext swap is 1004 and nothing is loaded; file
types that cannot be loaded from memory are refused with the reason."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.security.crypto import MAGIC, new_key_file
from llm_fixtures import write_llm_model

pytestmark = pytest.mark.timeout(300)
_SPEC: dict[str, Any] = {"backend": "transformers", "task": "chat", "max_model_len": 256,
                         "engine": {"max_num_seqs": 2}}


def _hf_model(repo: Path, name: str, source: Path, spec: dict[str, Any]) -> Path:
    """A model whose HF folder lies in its version folder (what ``inhouse encrypt`` encrypts)."""
    mdir = repo / name
    shutil.copytree(source, mdir / "1")
    (mdir / "model.yaml").write_text(yaml.safe_dump({"name": name, **spec}))
    return mdir


def _encrypt(mdir: Path, key: Path) -> None:
    res = CliRunner().invoke(app, ["encrypt", str(mdir), "--key-file", str(key)])
    assert res.exit_code == 0, res.output


def _load(srv: Any, name: str) -> tuple[int, str, str]:
    with srv.client() as c:
        r = c.post(f"/v2/repository/models/{name}/load")
        ready = c.get(f"/v2/models/{name}/ready").status_code
    assert r.status_code == 200 or ready == 503, "a failed load must leave nothing serving"
    return r.status_code, r.headers.get("inhouse-error-code", ""), r.text


def _files(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(root) for f in fs}


def test_encrypted_transformers_models(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    repo = tmp_path / "models"
    key = tmp_path / "model.key"
    new_key_file(key)
    chat = _hf_model(repo, "enc-chat", llm_models["qwen2"], _SPEC)
    bert = _hf_model(repo, "enc-bert", llm_models["bert"], {"backend": "transformers", "task": "embedding"})
    write_llm_model(repo, "plain-chat", llm_models["qwen2"], {k: v for k, v in _SPEC.items() if k != "backend"})
    plain = {p.name: p.read_bytes() for p in (chat / "1").iterdir()}
    for mdir in (chat, bert):
        _encrypt(mdir, key)
    assert all((chat / "1" / name).read_bytes().startswith(MAGIC) for name in plain)
    assert {"tokenizer.json", "config.json", "model.safetensors", "chat_template.jinja"} <= set(plain)

    before = _files(tmp_path)
    with run_server(repo, model_key_file=key, load="enc-chat,enc-bert,plain-chat") as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        answers = [c.chat.completions.create(
            model=m, messages=[{"role": "user", "content": "Hello there, how are you?"}], max_tokens=8,
            temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content for m in ("enc-chat",
                                                                                               "plain-chat")]
        assert answers[0] and answers[0] == answers[1]  # same weights, tokenizer and chat template
        emb = c.embeddings.create(model="enc-bert", input=["hello world"]).data[0].embedding
        assert len(emb) == 32 and any(v != 0 for v in emb)
    written = [p for p in _files(tmp_path) - before if p.is_file() and p.stat().st_size > 0]
    samples = [plain["model.safetensors"][-4096:], plain["tokenizer.json"][:256], plain["config.json"]]
    assert not any(s in p.read_bytes() for p in written for s in samples)  # no plaintext reached the disk



def test_encrypted_transformers_tampering_and_refusals(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    """A wrong key, a flipped byte in the weights or the tokenizer, or a plaintext file swapped
    in: 1004 and nothing loaded. Files that cannot be loaded from memory: 1001 with the reason,
    and nothing decrypted to disk. (Files are read at load time, so one server sees each case.)"""
    repo = tmp_path / "models"
    key, other = tmp_path / "model.key", tmp_path / "other.key"
    new_key_file(key)
    new_key_file(other)
    chat = _hf_model(repo, "enc-chat", llm_models["qwen2"], _SPEC)
    pickled = _hf_model(repo, "pickled", llm_models["qwen2"], _SPEC)
    (pickled / "1" / "model.safetensors").rename(pickled / "1" / "pytorch_model.bin")
    slow = _hf_model(repo, "slow-tok", llm_models["qwen2"], _SPEC)
    (slow / "1" / "tokenizer.json").unlink()
    (slow / "1" / "tokenizer.model").write_bytes(b"sentencepiece model")
    plain_config = (chat / "1" / "config.json").read_bytes()
    for mdir in (chat, pickled, slow):
        _encrypt(mdir, key)

    with run_server(repo, model_key_file=other, load="none") as srv:
        assert _load(srv, "enc-chat")[:2] == (422, "1004")
    before = _files(tmp_path)
    with run_server(repo, model_key_file=key, load="none") as srv:
        for name in ("model.safetensors", "tokenizer.json"):
            path = chat / "1" / name
            good = path.read_bytes()
            blob = bytearray(good)
            blob[len(blob) // 2] ^= 0x01
            path.write_bytes(bytes(blob))
            status, code, text = _load(srv, "enc-chat")
            assert (status, code) == (422, "1004") and "altered" in text and name in text, text
            path.write_bytes(good)
        (chat / "1" / "config.json").write_bytes(plain_config)
        status, code, text = _load(srv, "enc-chat")
        assert (status, code) == (422, "1004") and "plaintext" in text
        status, code, text = _load(srv, "pickled")
        assert (status, code) == (422, "1001") and "pickle" in text and "safetensors" in text, text
        status, code, text = _load(srv, "slow-tok")
        assert (status, code) == (422, "1001") and "tokenizer.json" in text, text
    assert not [p for p in _files(tmp_path) - before if "pytorch_model" in p.name or "tokenizer" in p.name]
