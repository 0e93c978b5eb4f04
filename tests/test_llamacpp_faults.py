"""``backend: llamacpp`` bad input and faults: a version folder without its GGUF, a file that is not
GGUF, and a child killed in the middle of a stream — which must end that stream with an error event
(not a hang, not a clean finish) while another model in the same server keeps serving and the
crashed one is restarted. A tiny random Llama converted here; real ``llama-server`` children."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import RunningServer, run_server, wait_until
from gguf_fixtures import need_convert_tools

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)
STEADY, VICTIM = "tiny-steady", "tiny-victim"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> tuple[Path, Path]:
    """(llama-server, a tiny Llama as f16 GGUF)."""
    from inhouse.tools.convert_gguf import convert_to_gguf

    binary = need_convert_tools()
    out = tmp_path_factory.mktemp("faults-gguf") / "m"
    r = convert_to_gguf(llm_models["llama"], out, "f16", tokenizer_pre="gpt-2", llama_server=str(binary))
    return binary, r.artefact


def _write(repo: Path, name: str, files: dict[str, Path | bytes], **llamacpp: Any) -> Path:
    vdir = repo / name / "1"
    vdir.mkdir(parents=True)
    for target, src in files.items():
        if isinstance(src, bytes):
            (vdir / target).write_bytes(src)
        else:
            shutil.copy(src, vdir / target)
    doc = {"name": name, "backend": "llamacpp", "task": "chat",
           "llamacpp": {"ctx_size": 2048, "parallel": 1, "threads": 1, **llamacpp}}
    (repo / name / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return vdir


def _index(srv: RunningServer) -> dict[str, dict[str, Any]]:
    with srv.client() as c:
        return {e["name"]: e for e in c.post("/v2/repository/index", json={}).json()}


def test_missing_and_non_gguf_files_fail_the_load_with_the_reason(tmp_path: Path, gguf: tuple[Path, Path]) -> None:
    binary, _ = gguf
    repo = tmp_path / "models"
    _write(repo, "no-file", {"README.txt": b"weights go here"})
    _write(repo, "not-gguf", {"model.gguf": b"PK\x03\x04 a zip archive, not a model"})
    with run_server(repo, llama_server=binary) as srv:
        index = _index(srv)
    missing, wrong = index["no-file"], index["not-gguf"]
    assert missing["state"] == "FAILED" and missing["code"] == 1005, missing
    assert "exactly one .gguf" in missing["reason"] and "found none" in missing["reason"], missing
    assert wrong["state"] == "FAILED" and wrong["code"] == 1001, wrong
    assert "is not a GGUF file" in wrong["reason"] and "convert" in wrong["reason"], wrong


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, gguf: tuple[Path, Path]) -> Iterator[RunningServer]:
    binary, model = gguf
    repo = tmp_path_factory.mktemp("faults") / "models"
    _write(repo, STEADY, {"model.gguf": model})
    _write(repo, VICTIM, {"model.gguf": model}, restarts=1)
    with run_server(repo, llama_server=binary) as srv:
        yield srv


def test_child_killed_mid_stream_ends_the_stream_with_an_error(two_models: RunningServer) -> None:
    srv = two_models
    child = srv.server.manager.resolve(VICTIM).model.child  # type: ignore[union-attr]
    old = child.pid
    assert old is not None
    body = {"model": VICTIM, "stream": True, "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "tell me a long story"}]}
    events: list[dict[str, Any]] = []
    with srv.client(timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if len(events) == 3:
                os.kill(old, signal.SIGKILL)
    content = [e for e in events if e.get("choices") and e["choices"][0].get("delta", {}).get("content")]
    assert len(content) >= 2, events[:5]  # it was streaming when the child died
    error = events[-1].get("error")
    assert error is not None, events[-3:]  # the stream ended with an error event, not a normal finish
    assert VICTIM in error["message"] and "llama-server" in error["message"], error
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events)

    # the other model kept serving, and the crashed one comes back
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)
    r2 = client.chat.completions.create(model=STEADY, max_tokens=4, temperature=0,
                                        messages=[{"role": "user", "content": "hi"}])
    assert r2.choices[0].finish_reason in ("stop", "length")
    wait_until(lambda: child.state == "ready" and child.pid not in (None, old), timeout=60)
    r3 = client.chat.completions.create(model=VICTIM, max_tokens=4, temperature=0,
                                        messages=[{"role": "user", "content": "hi"}])
    assert r3.choices[0].finish_reason in ("stop", "length")
