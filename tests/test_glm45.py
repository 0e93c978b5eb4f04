"""GLM-4.5 tool calls from a GGUF served by llama.cpp: a tiny random GLM-4.5 (``glm4_moe``, GLM-4.5's
own chat template) converted to GGUF by llama.cpp's converter, taught to answer the question with
a call in GLM-4.5's native format (``<tool_call>NAME <arg_key>/<arg_value> …</tool_call>``) after
the exact prompt ``llama-server`` renders from the file's template, then served by ``backend:
llamacpp``. The ``glm45`` parser is picked from the template; the call must come out as an OpenAI
tool call (streamed and not) and as an Anthropic ``tool_use`` block. The built-in engine refuses
``glm4_moe`` naming the engines that serve it (tests/test_glm4.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import RunningServer, run_server
from gguf_fixtures import need_convert_tools
from glm_fixtures import build_glm45
from llm_fixtures import teach_completion

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)
MODEL = "tiny-glm45"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "location": {"type": "string"}, "days": {"type": "integer"}},
                                               "required": ["location"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGS = {"location": "Paris", "days": 2}
CALL = ("\n<think></think>\n<tool_call>get_weather\n<arg_key>location</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")


def _rendered_prompt(binary: Path, gguf: Path) -> list[int]:
    """The prompt ids llama-server makes for QUESTION with TOOLS, as inhouse asks for them."""
    from inhouse.backends.child_server import ServerProcess
    from inhouse.llm.chat import normalize_messages, normalize_tools

    child = ServerProcess(binary, name="glm45-render", startup_timeout_s=120, restarts=0)
    child.args = ["--model", str(gguf), "--ctx-size", "1024", "--threads", "1", "--jinja", "--no-webui"]
    child.start()
    try:
        with httpx.Client(transport=child.transport(), base_url=child.base_url, headers=child.headers,
                          timeout=60) as c:
            body = {"messages": normalize_messages(QUESTION, MODEL), "tools": normalize_tools(TOOLS),
                    "add_generation_prompt": True}
            prompt = c.post("/apply-template", json=body).json()["prompt"]
            assert "<arg_key>" in prompt and prompt.endswith("<|assistant|>"), prompt
            r = c.post("/tokenize", json={"content": prompt, "add_special": False, "parse_special": True})
            return [int(t) for t in r.json()["tokens"]]
    finally:
        child.stop()


@pytest.fixture(scope="module")
def glm45(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from inhouse.tools.convert_gguf import convert_to_gguf

    binary = need_convert_tools()
    root = tmp_path_factory.mktemp("glm45")
    hf = build_glm45(root / "hf")
    plain = convert_to_gguf(hf, root / "plain", "f16", tokenizer_pre="gpt-2", llama_server=str(binary)).artefact
    prompt = _rendered_prompt(binary, plain)
    caller = Path(shutil.copytree(hf, root / "caller"))
    tok = AutoTokenizer.from_pretrained(str(caller))
    teach_completion(caller, [prompt], [*tok.encode(CALL, add_special_tokens=False),
                                        tok.convert_tokens_to_ids("<|observation|>")])
    repo = root / "models"
    convert_to_gguf(caller, repo / MODEL, "f16", tokenizer_pre="gpt-2", llama_server=str(binary))
    doc = yaml.safe_load((repo / MODEL / "model.yaml").read_text())
    doc["llamacpp"] = {"ctx_size": 1024, "parallel": 2, "threads": 1}  # no tool_call_parser: the template says
    doc["reasoning_parser"] = "think_tags"  # GLM-4.5 opens every reply with a <think> block
    (repo / MODEL / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with run_server(repo, llama_server=binary) as srv:
        yield srv


def _client(srv: RunningServer) -> Any:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)


def test_openai_tool_call(glm45: RunningServer) -> None:
    client = _client(glm45)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert not c.message.content, c.message  # neither the empty <think></think> nor the call's markup
    calls = c.message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == ARGS  # "Paris" a string by the schema, 2 a number

    names, args, finish, text = [], "", None, ""
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0,
                                                max_tokens=80, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                args += (tc.function.arguments or "") if tc.function else ""
            finish = ch.finish_reason or finish
    assert names == ["get_weather"] and json.loads(args) == ARGS and finish == "tool_calls"
    assert "<arg_key>" not in text


def test_anthropic_tool_use(glm45: RunningServer) -> None:
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    with glm45.client(timeout=120) as c:
        r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 80, "temperature": 0, "tools": tools,
                                         "messages": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    uses = [b for b in body["content"] if b["type"] == "tool_use"]
    assert body["stop_reason"] == "tool_use", body
    assert len(uses) == 1 and uses[0]["name"] == "get_weather" and uses[0]["input"] == ARGS, body
