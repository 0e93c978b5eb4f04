"""The Anthropic Messages API through the official ``anthropic`` SDK against a real server."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from conftest import RunningServer
from llm_api_fixtures import BERT, CHAT, LLAMA, THINK

pytestmark = pytest.mark.timeout(600)

WEATHER = {
    "name": "get_weather", "description": "Weather for a city.",
    "input_schema": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "maximum": 5}]}},
        "required": ["city", "unit", "days"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def client(llm_api_server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=llm_api_server.url, api_key="sk-ant-anything", max_retries=0, timeout=120)


def test_message_json(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="gpt-4o-mini", max_tokens=6, system="Be brief.",
                               messages=[{"role": "user", "content": "Hello there"}])
    assert m.type == "message" and m.role == "assistant" and m.model == "gpt-4o-mini"
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.content and m.content[0].type == "text"
    assert 0 < m.usage.output_tokens <= 6 and m.usage.input_tokens > 5


def test_stream_events_and_final_message(client: anthropic.Anthropic) -> None:
    kinds: list[str] = []
    with client.messages.stream(model=CHAT, max_tokens=6, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]) as s:
        for ev in s:
            kinds.append(ev.type)
        final = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "content_block_delta" in kinds and "message_delta" in kinds
    plain = client.messages.create(model=CHAT, max_tokens=6, extra_body={"temperature": 0},
                                   messages=[{"role": "user", "content": "Hi"}])
    assert final.content[0].text == plain.content[0].text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.usage.input_tokens == plain.usage.input_tokens


def test_forced_tool_use_and_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    for model in (CHAT, LLAMA):
        m = client.messages.create(model=model, max_tokens=150, extra_body={"temperature": 0.7},
                                   tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                   messages=[{"role": "user", "content": "Weather in Paris?"}])
        assert m.stop_reason == "tool_use"
        uses = [b for b in m.content if b.type == "tool_use"]
        assert len(uses) == 1 and uses[0].name == "get_weather"
        jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    followup = client.messages.create(model=CHAT, max_tokens=5, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {
            "type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": uses[0].input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny"},
                                     {"type": "text", "text": "Thanks!"}]}])
    assert followup.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_streamed_tool_use_input_json_delta(client: anthropic.Anthropic) -> None:
    deltas: list[str] = []
    with client.messages.stream(model=CHAT, max_tokens=150, extra_body={"temperature": 0}, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather?"}]) as s:
        for ev in s:
            if ev.type == "content_block_start":
                assert ev.content_block.type == "tool_use" and ev.content_block.name == "get_weather"
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                deltas.append(ev.delta.partial_json)
        final = s.get_final_message()
    assert len(deltas) > 2
    jsonschema.validate(json.loads("".join(deltas)), WEATHER["input_schema"])
    assert final.stop_reason == "tool_use" and final.content[0].input == json.loads("".join(deltas))


def test_thinking_blocks(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model=THINK, max_tokens=6, extra_body={"temperature": 0},
                               thinking={"type": "enabled", "budget_tokens": 1024},
                               messages=[{"role": "user", "content": "Hi"}])
    assert m.content[0].type == "thinking" and m.content[0].thinking
    with client.messages.stream(model=THINK, max_tokens=6, extra_body={"temperature": 0},
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=[{"role": "user", "content": "Hi"}]) as s:
        final = s.get_final_message()
    assert final.content[0].thinking == m.content[0].thinking


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model=CHAT, max_tokens=30, extra_body={"temperature": 0},
                                  messages=[{"role": "user", "content": "Hello"}]).content[0].text
    if len(full) < 8:
        pytest.skip("the random model stopped too early to pick a stop sequence")
    stop = full[4:7]
    m = client.messages.create(model=CHAT, max_tokens=30, extra_body={"temperature": 0}, stop_sequences=[stop],
                               messages=[{"role": "user", "content": "Hello"}])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert m.content[0].text == full[: full.index(stop)]


def test_count_tokens(client: anthropic.Anthropic) -> None:
    n = client.messages.count_tokens(model=CHAT, messages=[{"role": "user", "content": "Hello there"}])
    m = client.messages.create(model=CHAT, max_tokens=1, messages=[{"role": "user", "content": "Hello there"}])
    assert n.input_tokens == m.usage.input_tokens


def test_errors_in_anthropic_shape(llm_api_server: RunningServer, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert CHAT in str(e.value.message) and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="text only"):
        client.messages.create(model=CHAT, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    with pytest.raises(anthropic.BadRequestError, match="maximum context length"):
        client.messages.create(model=CHAT, max_tokens=5000, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError, match="embedding"):
        client.messages.create(model=BERT, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with httpx.Client(timeout=30) as h:
        r = h.post(llm_api_server.url + "/v1/messages", json={"model": CHAT, "messages": []})  # no max_tokens
        body: dict[str, Any] = r.json()
    assert r.status_code == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_structured_output(client: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["answer", "score"], "additionalProperties": False}
    m = client.messages.create(model=LLAMA, max_tokens=100, messages=[{"role": "user", "content": "Yes?"}],
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(m.content[0].text), schema)
