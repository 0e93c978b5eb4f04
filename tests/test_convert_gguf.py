"""``inhouse convert HF_FOLDER --to gguf``: the tiny random Llama of the LLM fixtures converted by
the real CLI (a child process) with llama.cpp's converter and llama-quantize, then served as it
is by ``backend: llamacpp`` and called through the ``openai`` SDK; bad input gets coded errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from gguf_fixtures import need_convert_tools

openai = pytest.importorskip("openai")
runner = CliRunner()


def _convert(src: Path, out: Path, *args: str, binary: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INHOUSE_LLAMA_SERVER": str(binary)}
    return subprocess.run([sys.executable, "-m", "inhouse", "convert", str(src), "--to", "gguf", "--out", str(out),
                           *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> tuple[Path, Path]:
    """(repository, llama-server): 'tiny-q8' (q8_0 from the converter) and 'tiny-q4' (q4_k_m
    through llama-quantize), both converted from the same HF folder."""
    binary = need_convert_tools()
    repo = tmp_path_factory.mktemp("gguf-repo") / "models"
    for name, quant in (("tiny-q8", "q8_0"), ("tiny-q4", "q4_k_m")):
        proc = _convert(llm_models["llama"], repo / name, "--quant", quant, "--tokenizer-pre", "gpt-2", binary=binary)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"GGUF {quant.upper()}" in proc.stdout
    return repo, binary


def test_converted_folders_are_llamacpp_models_with_checksums(converted: tuple[Path, Path]) -> None:
    repo, _ = converted
    sizes = {}
    for name in ("tiny-q8", "tiny-q4"):
        doc = yaml.safe_load((repo / name / "model.yaml").read_text())
        assert doc["backend"] == "llamacpp" and doc["task"] == "chat" and doc["name"] == name
        gguf = repo / name / "1" / "model.gguf"
        assert gguf.read_bytes()[:4] == b"GGUF"
        assert doc["files"]["sha256"] == {"1/model.gguf": hashlib.sha256(gguf.read_bytes()).hexdigest()}
        sizes[name] = gguf.stat().st_size
        assert not [p for p in (repo / name).iterdir() if p.name.startswith(".gguf-")]  # no work folder left
    assert sizes["tiny-q4"] < sizes["tiny-q8"]


def test_converted_models_serve_as_they_are(converted: tuple[Path, Path]) -> None:
    repo, binary = converted
    with run_server(repo, llama_server=binary) as srv:
        with srv.client() as c:
            states = {e["name"]: e["state"] for e in c.post("/v2/repository/index", json={}).json()}
        assert states == {"tiny-q8": "READY", "tiny-q4": "READY"}
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)
        for name in ("tiny-q8", "tiny-q4"):
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello world"}],
                                               max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].finish_reason == "length"
            assert r.usage is not None and r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 4


def test_a_second_conversion_adds_a_version_and_keeps_user_keys(tmp_path: Path, llm_models: dict[str, Path]
                                                                ) -> None:
    binary = need_convert_tools()
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.yaml").write_text(yaml.safe_dump({"name": "mine", "llamacpp": {"ctx_size": 1024}}))
    (out / "1").mkdir()
    proc = _convert(llm_models["llama"], out, "--tokenizer-pre", "gpt-2", binary=binary)  # f16 by default
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = yaml.safe_load((out / "model.yaml").read_text())
    assert doc["name"] == "mine" and doc["llamacpp"] == {"ctx_size": 1024} and doc["backend"] == "llamacpp"
    assert list(doc["files"]["sha256"]) == ["2/model.gguf"]


def _cli(*args: str) -> tuple[int, str]:
    from inhouse.cli import app

    r = runner.invoke(app, ["convert", *args])
    return r.exit_code, r.output


def test_bad_input_gets_coded_errors(tmp_path: Path, llm_models: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    binary = need_convert_tools()
    monkeypatch.setenv("INHOUSE_LLAMA_SERVER", str(binary))
    out = tmp_path / "out"
    code, text = _cli(str(tmp_path), "--to", "gguf", "--out", str(out))  # a folder, but no config.json
    assert code == 1 and "[1001]" in text and "not a Hugging Face model folder" in text
    code, text = _cli(str(llm_models["llama"]), "--to", "gguf", "--quant", "q3_xx", "--out", str(out))
    assert code == 1 and "[1007]" in text and "q4_k_m" in text
    code, text = _cli(str(llm_models["llama"]), "--to", "gguf", "--tokenizer-pre", "nonsense", "--out", str(out))
    assert code == 1 and "[1007]" in text and "--tokenizer-pre 'nonsense'" in text
    code, text = _cli(str(llm_models["llama"]), "--to", "tflite", "--out", str(out))
    assert code == 2 and "--to must be onnx or gguf" in text
    assert not out.exists()


def test_unrecognised_tokenizer_names_the_option(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    proc = _convert(llm_models["llama"], tmp_path / "out", binary=need_convert_tools())
    assert proc.returncode == 1
    assert "[1007]" in proc.stderr and "--tokenizer-pre" in proc.stderr
    assert not list((tmp_path / "out").glob("*/model.gguf"))


def test_missing_llama_cpp_build_names_the_build_script(tmp_path: Path, llm_models: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INHOUSE_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    code, text = _cli(str(llm_models["llama"]), "--to", "gguf", "--out", str(tmp_path / "out"))
    assert code == 1 and "[1008]" in text and "scripts/build_llama_server.sh" in text
