"""``backend: vllm``: the relay to a supervised OpenAI-compatible child. On a CPU machine the real
``llama-server`` stands in for ``vllm serve`` (the ``vllm_command`` setting replaces the command;
everything else — the loopback port, the per-start key, health, restarts, prompts rendered with
the folder's own tokenizer, the ``/v1/completions`` stream — is inhouse's real code), called
through the ``openai`` SDK. The tests marked ``gpu`` run the real vLLM where an NVIDIA GPU and the
``vllm`` command exist."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import RunningServer, run_server, wait_until
from gguf_fixtures import need_convert_tools

openai = pytest.importorskip("openai")
MODEL = "tiny-vllm"


def _write(repo: Path, name: str, source: Path, vllm: dict[str, Any] | None = None, **spec: Any) -> Path:
    (repo / name / "1").mkdir(parents=True)
    doc = {"name": name, "backend": "vllm", "task": "chat", "source": str(source), "vllm": vllm or {}, **spec}
    (repo / name / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return repo / name


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> tuple[Path, list[str]]:
    """(HF folder, a llama-server command line serving the same model as GGUF)."""
    from inhouse.tools.convert_gguf import convert_to_gguf

    binary = need_convert_tools()
    out = tmp_path_factory.mktemp("vllm-gguf") / "m"
    r = convert_to_gguf(llm_models["llama"], out, "f16", tokenizer_pre="gpt-2", llama_server=str(binary))
    command = [str(binary), "--model", str(r.artefact), "--ctx-size", "2048", "--parallel", "2", "--threads", "1",
               "--no-webui", "--metrics"]  # vllm serve has /metrics by default
    return llm_models["llama"], command


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, stand_in: tuple[Path, list[str]]) -> Iterator[RunningServer]:
    source, command = stand_in
    repo = tmp_path_factory.mktemp("vllm") / "models"
    _write(repo, MODEL, source, {"max_model_len": 2048}, tool_call_parser="hermes")
    _write(repo, "tiny-vllm-crash", source, {"max_model_len": 2048, "restarts": 1})
    with run_server(repo, vllm_command=command) as srv:
        yield srv


def _client(srv: RunningServer) -> Any:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)


def _index(srv: RunningServer) -> dict[str, dict[str, Any]]:
    with srv.client() as c:
        return {e["name"]: e for e in c.post("/v2/repository/index", json={}).json()}


def test_chat_streams_through_the_relay(relay: RunningServer, stand_in: tuple[Path, list[str]]) -> None:
    from transformers import AutoTokenizer

    assert _index(relay)[MODEL]["state"] == "READY"
    with relay.client() as c:
        assert c.get(f"/v2/models/{MODEL}").json()["platform"] == "vllm"
    client = _client(relay)
    messages = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    # the prompt was rendered with the folder's own tokenizer and template, as vLLM would
    tok = AutoTokenizer.from_pretrained(str(stand_in[0]))
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                tokenize=True, return_dict=False))
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == r.choices[0].message.content and finish == "length"
    assert usage is not None and usage.completion_tokens == 8


def test_json_schema_reaches_the_child(relay: RunningServer) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = _client(relay).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "which city?"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_v2_infer_and_anthropic(relay: RunningServer) -> None:
    with relay.client(timeout=120) as c:
        r = c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
        assert r.status_code == 200, r.text
        r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 4, "temperature": 0,
                                         "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200 and r.json()["usage"]["output_tokens"] >= 1, r.text


def test_the_childs_own_metrics_come_under_inhouse_names(relay: RunningServer) -> None:
    """The child's namespaced metrics (here the stand-in's ``llamacpp:``, with vLLM ``vllm:``)
    are re-exported with the model's labels; none keep the child's own names."""
    r = _client(relay).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, temperature=0)
    assert r.usage is not None

    def lines() -> list[str]:
        with relay.client(timeout=30) as c:
            return c.get("/metrics").text.splitlines()

    def predicted() -> float:
        found = [ln for ln in lines() if ln.startswith("inhouse_llamacpp_tokens_predicted_total{")
                 and f'model="{MODEL}"' in ln and 'version="1"' in ln]
        return float(found[0].rsplit(" ", 1)[1]) if found else 0.0

    wait_until(lambda: predicted() >= 3, timeout=30)
    assert not any(ln.startswith("llamacpp:") for ln in lines())


def test_killed_child_restarts_on_its_port(relay: RunningServer) -> None:
    child = relay.server.manager.resolve("tiny-vllm-crash").model.child  # type: ignore[union-attr]
    old, url = child.pid, child.base_url
    assert old is not None and url.startswith("http://127.0.0.1:")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: child.state == "ready" and child.pid not in (None, old), timeout=60)
    assert child.base_url == url and "vllm exited with status -9" in child.last_crash
    r = _client(relay).chat.completions.create(model="tiny-vllm-crash", max_tokens=3, temperature=0,
                                               messages=[{"role": "user", "content": "hi"}])
    assert r.usage is not None and r.usage.completion_tokens >= 1


def test_child_key_is_required(relay: RunningServer) -> None:
    import httpx

    child = relay.server.manager.resolve(MODEL).model.child  # type: ignore[union-attr]
    assert httpx.get(f"{child.base_url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{child.base_url}/v1/models", headers=child.headers, timeout=10).status_code == 200
    assert child.api_key not in " ".join(child.args)


def test_missing_vllm_fails_the_load_with_1001(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    repo = tmp_path / "models"
    _write(repo, MODEL, llm_models["llama"])
    with run_server(repo, vllm=tmp_path / "no-such-vllm") as srv:
        entry = _index(srv)[MODEL]
    assert entry["state"] == "FAILED" and entry["code"] == 1001
    assert "INHOUSE_VLLM" in entry["reason"]


def test_serve_args_follow_model_yaml(tmp_path: Path) -> None:
    from inhouse.backends.vllm import serve_args
    from inhouse.core.spec import ModelSpec

    spec = ModelSpec.model_validate({
        "name": "glm", "backend": "vllm", "task": "chat", "dtype": "bfloat16", "chat_template": "{{ messages }}",
        "engine": {"gpu_memory_fraction": 0.7, "max_num_seqs": 12},
        "vllm": {"tensor_parallel_size": 2, "quantization": "awq", "tool_call_parser": "glm45",
                 "reasoning_parser": "glm45", "extra_args": ["--enforce-eager"]}})
    args = serve_args(spec, Path("/models/glm"), tmp_path, 8192)
    flat = " ".join(args)
    assert args[:2] == ["serve", "/models/glm"] and args[-1] == "--enforce-eager"
    for part in ("--served-model-name glm", "--gpu-memory-utilization 0.7", "--tensor-parallel-size 2",
                 "--max-num-seqs 12", "--max-model-len 8192", "--dtype bfloat16", "--quantization awq",
                 "--enable-auto-tool-choice --tool-call-parser glm45", "--reasoning-parser glm45",
                 f"--chat-template {tmp_path / 'chat_template.jinja'}"):
        assert part in flat
    assert (tmp_path / "chat_template.jinja").read_text() == "{{ messages }}"
    spec.vllm.gpu_memory_utilization = 0.9
    assert "--gpu-memory-utilization 0.9" in " ".join(serve_args(spec, Path("/m"), tmp_path, 1024))


def test_chat_messages_put_each_image_in_its_place() -> None:
    """What the vLLM engine sends for a chat with images: the client's parts in order, each image
    as a data URL of its own format, tool-call arguments as JSON strings."""
    import base64

    from inhouse.backends.vllm import chat_messages
    from inhouse.llm.images import IMAGE_MARKER
    from vlm_fixtures import png

    one, two = png(2, 2, lambda x, y: (1, 2, 3)), b"\xff\xd8\xff\xe0 a jpeg"
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": f"first\n{IMAGE_MARKER}\nthen\n{IMAGE_MARKER}", "images": ["refs"]},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]
    out = chat_messages(messages, [one, two])
    assert out[0] == messages[0]
    assert out[1] == {"role": "user", "content": [
        {"type": "text", "text": "first"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(one).decode()}},
        {"type": "text", "text": "then"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(two).decode()}}]}
    assert out[2]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'


def test_reasoning_split_off_by_vllm_comes_back_in_think_tags() -> None:
    from inhouse.backends.relay import StreamState
    from inhouse.backends.vllm import _delta_text
    from inhouse.llm.types import GenerationRequest

    state = StreamState(GenerationRequest("r", [1]), 1)
    pieces = [{"delta": {"reasoning_content": "hm"}}, {"delta": {"reasoning": "m"}}, {"delta": {"content": "Hi"}},
              {"delta": {"content": "!"}, "finish_reason": "stop"}]
    assert "".join(_delta_text(p, state) for p in pieces) == "<think>hmm</think>Hi!"
    state = StreamState(GenerationRequest("r", [1]), 1)
    cut = [{"delta": {"reasoning": "cut"}}, {"delta": {}, "finish_reason": "length"}]
    assert "".join(_delta_text(p, state) for p in cut) == "<think>cut</think>"


def _gpu_and_vllm() -> bool:
    if shutil.which("vllm") is None or shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs an NVIDIA GPU and the vllm command")
def test_real_vllm_serves_the_tiny_model(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    repo = tmp_path / "models"
    _write(repo, MODEL, llm_models["llama"], {"gpu_memory_utilization": 0.3, "max_model_len": 1024,
                                             "extra_args": ["--enforce-eager"]}, tool_call_parser="hermes")
    with run_server(repo) as srv:
        assert _index(srv)[MODEL]["state"] == "READY", _index(srv)[MODEL]
        r = _client(srv).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 6

        def scrape() -> str:
            with srv.client(timeout=30) as c:
                return c.get("/metrics").text

        # vLLM's own metrics under inhouse's names, and its KV cache use on inhouse's gauge
        wait_until(lambda: 'inhouse_vllm_num_requests_running{' in scrape(), timeout=30)
        wait_until(lambda: any(ln.startswith("inhouse_llm_kv_cache_usage_ratio{") and f'model="{MODEL}"' in ln
                               for ln in scrape().splitlines()), timeout=30)


def test_kv_cache_use_is_read_from_an_engines_metrics() -> None:
    """The KV cache in use as vLLM's V1 engine, its V0 engine and older llama-server name it."""
    from inhouse.backends.relay import read_metrics

    def kv_cache_usage(text: str) -> float | None:
        return read_metrics(text)[1]

    v1 = ('# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n'
          '# TYPE vllm:kv_cache_usage_perc gauge\n'
          'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
          'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n')
    assert kv_cache_usage(v1) == 0.25
    assert kv_cache_usage('vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n') == 0.5
    assert kv_cache_usage("llamacpp:kv_cache_usage_ratio 0.125\n") == 0.125
    assert kv_cache_usage("llamacpp:requests_processing 1\n") is None
    assert read_metrics("not { an exposition") == ([], None)


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs an NVIDIA GPU and the vllm command")
def test_real_vllm_reads_images(tmp_path: Path) -> None:
    """A tiny random SmolVLM (Idefics3) folder, found to be a VLM from its config: chats with images
    go to vLLM's chat endpoint as data URLs, and two different images give different greedy outputs."""
    import base64

    from vlm_fixtures import build_vlm, png

    hf = build_vlm(tmp_path / "hf")
    repo = tmp_path / "models"
    _write(repo, MODEL, hf, {"gpu_memory_utilization": 0.3, "max_model_len": 1024, "extra_args": ["--enforce-eager"]},
           dtype="float32")

    def describe(image: bytes) -> str:
        url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
        r = _client(srv).chat.completions.create(
            model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": [{"type": "text", "text": "describe the picture"},
                                                   {"type": "image_url", "image_url": {"url": url}}]}])
        assert r.usage is not None and r.usage.completion_tokens == 8
        return r.choices[0].message.content or ""

    with run_server(repo) as srv:
        assert _index(srv)[MODEL]["state"] == "READY", _index(srv)[MODEL]
        red = describe(png(64, 64, lambda x, y: (255, 0, 0)))
        checks = describe(png(64, 64, lambda x, y: (0, 0, 255) if (x // 8 + y // 8) % 2 else (255, 255, 255)))
        assert red != checks
