"""GLM-4 (``glm4``) on the built-in Transformers engine: a tiny random Glm4ForCausalLM with GLM-4's
chat template, served by a real server and called through the ``openai`` SDK. Its greedy output
must equal ``transformers``' own ``generate`` (the engine's GLM block — interleaved partial rotary
embedding, extra norms — is ours), and a copy taught to answer with a call in GLM-4's native
format (``get_weather\\n{...}``) comes out as OpenAI tool calls, streamed and not. Architectures
the engine refuses name the engine that serves them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningServer, run_server
from glm_fixtures import build_glm4
from llm_fixtures import teach_completion, write_llm_model

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "location": {"type": "string"}}, "required": ["location"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGS = {"location": "Paris"}
CALL = "get_weather\n" + json.dumps(ARGS)


@pytest.fixture(scope="module")
def glm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from inhouse.llm.chat import normalize_tools

    root = tmp_path_factory.mktemp("glm4")
    plain = build_glm4(root / "glm4")
    caller = Path(shutil.copytree(plain, root / "glm4-caller"))
    tok = AutoTokenizer.from_pretrained(str(caller))
    prompt = tok.apply_chat_template(QUESTION, tools=normalize_tools(TOOLS), add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    teach_completion(caller, [list(prompt)],
                     [*tok.encode(CALL, add_special_tokens=False), tok.convert_tokens_to_ids("<|observation|>")])
    repo = root / "models"
    write_llm_model(repo, "glm4", plain, {"max_model_len": 1024})
    write_llm_model(repo, "glm4-caller", caller, {"max_model_len": 1024})  # parser found from the template
    with run_server(repo) as srv:
        yield srv, plain


def _client(srv: RunningServer) -> Any:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)


def test_greedy_chat_matches_transformers_generate(glm: tuple[RunningServer, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    srv, hf = glm
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "hello world"}]
    r = _client(srv).chat.completions.create(model="glm4", messages=messages, max_tokens=16, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 16

    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.usage.prompt_tokens == len(ids)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert r.choices[0].message.content == tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_native_tool_call_becomes_an_openai_tool_call(glm: tuple[RunningServer, Path]) -> None:
    client = _client(glm[0])
    r = client.chat.completions.create(model="glm4-caller", messages=QUESTION, tools=TOOLS, temperature=0,
                                       max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert not c.message.content  # the markup never leaks into content
    calls = c.message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == ARGS

    names, args, finish = [], "", None
    for chunk in client.chat.completions.create(model="glm4-caller", messages=QUESTION, tools=TOOLS,
                                                temperature=0, max_tokens=40, stream=True):
        for ch in chunk.choices:
            assert not ch.delta.content
            for tc in ch.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                args += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    assert names == ["get_weather"] and json.loads(args) == ARGS and finish == "tool_calls"

    # the call and its result go back through GLM-4's template (<|observation|>) for the next turn
    follow = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 celsius"}]
    r = client.chat.completions.create(model="glm4-caller", messages=follow, tools=TOOLS, temperature=0,
                                       max_tokens=8)
    assert r.usage is not None and r.usage.prompt_tokens > len(json.dumps(TOOLS)) // 8


@pytest.mark.parametrize(("model_type", "extra", "engine"), [
    ("gpt2", {}, "--to gguf"),
    ("glm4_moe", {}, "--to gguf"),  # GLM-4.5 / 4.6
    ("qwen2_vl", {"vision_config": {}}, "llamacpp.mmproj"),
    ("glm4v", {}, "llamacpp.mmproj"),  # GLM-4.1V (AutoGLM-Phone-9B): a VLM by its type alone
])
def test_refused_architectures_name_the_engine_that_serves_them(tmp_path: Path, llm_models: dict[str, Path],
                                                                model_type: str, extra: dict[str, Any],
                                                                engine: str) -> None:
    src = Path(shutil.copytree(llm_models["llama"], tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": model_type, **extra}))
    repo = tmp_path / "models"
    write_llm_model(repo, "other", src)
    with run_server(repo) as srv, srv.client() as c:
        entry = {e["name"]: e for e in c.post("/v2/repository/index", json={}).json()}["other"]
    assert entry["state"] == "FAILED" and entry["code"] == 1001
    assert f"'{model_type}'" in entry["reason"] and "backend: vllm" in entry["reason"]
    assert engine in entry["reason"] and "backend: llamacpp" in entry["reason"]
