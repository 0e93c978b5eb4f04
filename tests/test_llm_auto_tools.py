"""Tool calls in ``tool_choice: "auto"`` mode end to end: a tiny Qwen2-style model trained in the
fixture (a few hundred optimiser steps, a couple of seconds) so that greedy decoding answers the
weather question with a Hermes ``<tool_call>`` — nothing constrains its output — served by a
real server and read through the official ``openai`` and ``anthropic`` SDKs, streaming and not."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from conftest import RunningServer, run_server
from inhouse.llm.chat import normalize_tools
from llm_fixtures import teach_completion, write_llm_model

pytestmark = pytest.mark.timeout(300)

MODEL = "qwen-caller"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
          "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                                  "parameters": SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather for a city.", "input_schema": SCHEMA}]
ARGS = {"city": "Paris", "unit": "celsius"}
# What the model was taught to say: a sentence, then a call in its native markup, then <|im_end|>.
PREFACE = "Let me check."
REPLY = PREFACE + '\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(ARGS) + "}\n</tool_call>"


@pytest.fixture(scope="module")
def caller_server(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> Iterator[RunningServer]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("caller")
    src = Path(shutil.copytree(llm_models["qwen2"], root / "hf"))  # the tiny random Qwen2, taught below
    tok = AutoTokenizer.from_pretrained(str(src))
    # the prompt both APIs render for QUESTION + the get_weather tool (they normalise tools alike)
    prompt = tok.apply_chat_template(QUESTION, tools=normalize_tools(OPENAI_TOOLS), add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    completion = [*tok.encode(REPLY, add_special_tokens=False), tok.convert_tokens_to_ids("<|im_end|>")]
    teach_completion(src, [list(prompt)], completion)
    repo = root / "models"
    write_llm_model(repo, MODEL, src, {"tool_call_parser": "hermes", "max_model_len": 1024})
    with run_server(repo) as s:
        yield s


@pytest.fixture(scope="module")
def oai(caller_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=caller_server.url + "/v1", api_key="sk-x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ant(caller_server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=caller_server.url, api_key="sk-ant-x", max_retries=0, timeout=60)


def test_openai_auto_tool_call(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, tools=OPENAI_TOOLS, tool_choice="auto",
                                    temperature=0, max_tokens=100)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    # the text before the call is content (the newline that separates it from the markup too);
    # the markup itself never leaks into content
    assert c.message.content == PREFACE + "\n"
    calls = c.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function" and calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == ARGS


def test_openai_auto_tool_call_streamed(oai: openai.OpenAI) -> None:
    content, names, ids, args, finals = "", [], [], "", []
    first_call_delta: Any = None
    for ch in oai.chat.completions.create(model=MODEL, messages=QUESTION, tools=OPENAI_TOOLS, temperature=0,
                                          max_tokens=100, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            assert tc.index == 0
            if first_call_delta is None:
                first_call_delta = tc
            if tc.id:
                ids.append(tc.id)
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            args += (tc.function.arguments or "") if tc.function else ""
        if ch.choices[0].finish_reason:
            finals.append(ch.choices[0].finish_reason)
    assert finals == ["tool_calls"]
    assert content == PREFACE + "\n"
    assert first_call_delta.id and first_call_delta.function.name == "get_weather"  # id and name come first
    assert names == ["get_weather"] and len(ids) == 1
    assert json.loads(args) == ARGS


def test_openai_auto_call_round_trip(oai: openai.OpenAI) -> None:
    """The call the model made goes back as an assistant message plus a tool result."""
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, tools=OPENAI_TOOLS, temperature=0,
                                    max_tokens=100)
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    follow = oai.chat.completions.create(model=MODEL, tools=OPENAI_TOOLS, max_tokens=3, temperature=0, messages=[
        *QUESTION, r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}])
    assert follow.usage is not None and follow.usage.prompt_tokens > r.usage.prompt_tokens  # type: ignore[union-attr]


def test_anthropic_auto_tool_use(ant: anthropic.Anthropic) -> None:
    m = ant.messages.create(model=MODEL, max_tokens=100, tools=ANTHROPIC_TOOLS, tool_choice={"type": "auto"},
                            messages=QUESTION, extra_body={"temperature": 0})
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use"]
    assert m.content[0].text == PREFACE + "\n"  # type: ignore[union-attr]
    use = m.content[1]
    assert use.name == "get_weather" and use.id and use.input == ARGS  # type: ignore[union-attr]


def test_anthropic_auto_tool_use_streamed(ant: anthropic.Anthropic) -> None:
    kinds: list[str] = []
    partial = ""
    with ant.messages.stream(model=MODEL, max_tokens=100, tools=ANTHROPIC_TOOLS, messages=QUESTION,
                             extra_body={"temperature": 0}) as s:
        for ev in s:
            kinds.append(ev.type)
            if ev.type == "content_block_start" and ev.content_block.type == "tool_use":
                assert ev.content_block.name == "get_weather" and ev.content_block.id
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial += ev.delta.partial_json
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == PREFACE + "\n"  # type: ignore[union-attr]
    assert final.content[1].input == ARGS == json.loads(partial)  # type: ignore[union-attr]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


def test_tool_choice_none_reports_no_call(oai: openai.OpenAI) -> None:
    """tool_choice 'none' drops the tools from the prompt and turns the parser off: no call."""
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, tools=OPENAI_TOOLS, tool_choice="none",
                                    temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")
