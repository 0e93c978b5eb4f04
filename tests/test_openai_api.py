"""The OpenAI-compatible API through the official ``openai`` SDK (and raw httpx where the wire
format itself is the point), against a real server with tiny random Qwen2- and Llama-style
chat models."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from conftest import RunningServer, run_server
from llm_api_fixtures import BERT, CHAT, LLAMA, THINK, build_llm_repo

pytestmark = pytest.mark.timeout(600)

@pytest.fixture(scope="module")
def srv(llm_api_server: RunningServer) -> RunningServer:
    return llm_api_server


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-anything", max_retries=0, timeout=120)


def tokenizer(srv: RunningServer, model: str = CHAT) -> Any:
    return srv.server.manager.resolve(model).model.engine.tokenizer  # type: ignore[union-attr]


def prompt_len(srv: RunningServer, messages: list[dict[str, Any]], model: str = CHAT, **kw: Any) -> int:
    engine = srv.server.manager.resolve(model).model.engine  # type: ignore[union-attr]
    return len(engine.apply_chat_template(messages, kw.get("tools"), add_generation_prompt=True))


HELLO = [{"role": "user", "content": "Hello there, how are you?"}]

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "detail": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
        "kind": {"const": "forecast"},
    },
    "required": ["city", "unit", "days", "detail", "kind"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                         "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]


# ---- models ---------------------------------------------------------------------------------------
def test_models_list_has_served_names(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {CHAT, "gpt-4o-mini", LLAMA} <= ids
    assert "add" not in ids  # tensor models are not LLMs
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


# ---- basic chat -----------------------------------------------------------------------------------
def _shared_template_len(srv: RunningServer) -> int:
    """Prompt tokens any two one-message chats can share (the template around the user's text):
    at most this many of a new text's prompt come from the prefix cache."""
    return prompt_len(srv, [{"role": "user", "content": ""}])


def test_chat_json_usage_and_alias(srv: RunningServer, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me the weather in Tokyo in celsius for each day, please."}]
    r = client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    n = prompt_len(srv, messages)
    assert r.usage.prompt_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.usage.prompt_tokens_details.cached_tokens <= _shared_template_len(srv) < n - 10
    # the same prompt again: all of it but the last token (whose logits start decoding) is cached
    again = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == n - 1


def test_stream_role_first_finish_last_usage_by_default(srv: RunningServer, client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Which city has more people, Paris or London, and by how many?"}]
    chunks = list(client.chat.completions.create(model=CHAT, messages=messages, max_tokens=5, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None  # sent although not asked for
    assert usage.usage.completion_tokens == 5
    n = prompt_len(srv, messages)
    assert usage.usage.prompt_tokens == n
    assert usage.usage.prompt_tokens_details.cached_tokens <= _shared_template_len(srv) < n - 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    same = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert text == same.choices[0].message.content
    assert same.usage.prompt_tokens_details.cached_tokens == n - 1  # the stream's prompt, reused


def test_stream_usage_can_be_turned_off_and_done_marker(srv: RunningServer) -> None:
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": False}}
    with httpx.Client(timeout=60, headers={"Accept-Encoding": "gzip"}) as h:
        resp = h.post(srv.url + "/v1/chat/completions", json=body)
        lines = [ln for ln in resp.text.split("\n") if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in resp.headers  # events are never held back by compression
    assert lines[-1] == "data: [DONE]"
    docs = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(d["choices"] for d in docs)  # no usage chunk
    assert docs[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_usage_default_and_deadline_are_configurable(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    root = build_llm_repo(tmp_path / "models", llm_models, only=[CHAT])
    # the tiny model writes 1,000 tokens in ~0.6 s on a fast 2-core machine: the deadline must be
    # well under that (2 s never fired there), yet leave time for the first streamed token
    with run_server(root, llm_stream_usage=False, llm_timeout_s=0.2) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        chunks = list(c.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2, stream=True))
        assert all(ch.usage is None for ch in chunks)
        chunks = list(c.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2, stream=True,
                                                stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 2
        # a generation that outlives llm_timeout_s ends with 504 (code 3002)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=1000, extra_body={"ignore_eos": True})
        assert e.value.status_code == 504 and e.value.body["code"] == "3002"
        # after the stream started, the error arrives in-band and the SDK raises it
        got: list[Any] = []
        with pytest.raises(openai.APIError, match="deadline"):
            for ch in c.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=1000, stream=True,
                                                extra_body={"ignore_eos": True}):
                got.append(ch)
        assert got and got[0].choices[0].delta.role == "assistant"


# ---- request compatibility ------------------------------------------------------------------------
def test_content_parts_equal_plain_string(client: openai.OpenAI) -> None:
    a = client.chat.completions.create(model=CHAT, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hello there,"}, {"type": "text", "text": "friend"}]}])
    b = client.chat.completions.create(model=CHAT, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "Hello there,\nfriend"}])
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_image_to_text_model_is_a_clear_400(client: openai.OpenAI) -> None:
    big = base64.b64encode(b"\x89PNG" + b"\0" * 3_000_000).decode()  # a several-MB body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{big}"}}]}])
    assert e.value.status_code == 400
    assert "text only" in e.value.message and "messages[0].content[1]" in e.value.message
    assert e.value.body["param"] == "messages[0].content[1]"


def test_agent_conversation_shapes(srv: RunningServer, client: openai.OpenAI) -> None:
    """system + developer, consecutive user turns, assistant null content with tool_calls, tool
    results without name, a user turn right after tool results, reasoning_content."""
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "user", "content": "And add 2 and 3."},
        {"role": "assistant", "content": None, "reasoning_content": "I should call tools.",
         "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments":
                 '{"city": "Paris", "unit": "celsius", "days": 1, "detail": null, "kind": "forecast"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "5"}]},
        {"role": "user", "content": "Thanks, summarise."},
    ]
    r = client.chat.completions.create(model=CHAT, messages=messages, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the tool results reached the prompt
    assert r.usage.prompt_tokens == prompt_len(srv, _normalised(messages), tools=TOOLS)
    assert "Sunny, 21 C" in tokenizer(srv).decode(_prompt_ids(srv, _normalised(messages), TOOLS))
    r2 = client.chat.completions.create(model=LLAMA, messages=messages, tools=TOOLS, max_tokens=4)
    assert r2.usage.prompt_tokens > 0


def _normalised(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from inhouse.llm.chat import normalize_messages

    return normalize_messages(messages, CHAT)


def _prompt_ids(srv: RunningServer, messages: list[dict[str, Any]], tools: Any) -> list[int]:
    engine = srv.server.manager.resolve(CHAT).model.engine  # type: ignore[union-attr]
    return list(engine.apply_chat_template(messages, tools, add_generation_prompt=True))


def test_sampling_parameters(client: openai.OpenAI) -> None:
    def ask(**kw: Any) -> Any:
        return client.chat.completions.create(model=CHAT, messages=HELLO, **kw)

    greedy = ask(max_completion_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert greedy.usage.completion_tokens == 12  # max_completion_tokens is max_tokens
    assert ask(max_tokens=12, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content \
        == greedy.choices[0].message.content
    seeded = [ask(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, extra_body={"top_k": 20, "ignore_eos": True})
              .choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    pen = ask(max_tokens=8, temperature=0, frequency_penalty=1.5, presence_penalty=1.0)
    assert pen.choices[0].finish_reason in ("stop", "length")
    many = ask(max_tokens=6, temperature=1.0, n=3, seed=1, extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == 18


def test_stop_strings_are_not_echoed(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=30, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=30, temperature=0,
                                         stop=[stop, "never-there"], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in lp)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in lp)
    assert "".join(t.token for t in lp) == r.choices[0].message.content


def test_template_kwargs_and_unknown_fields_are_accepted(client: openai.OpenAI,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.protocols.llm_http")
    on = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2, extra_body={
        "chat_template_kwargs": {"enable_thinking": True}, "some_future_field": {"x": 1}, "metadata": {"a": "b"},
        "store": False, "service_tier": "auto"})
    off = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}})
    assert on.usage.prompt_tokens != off.usage.prompt_tokens  # the kwarg reached the template
    logged = [r for r in caplog.records if r.getMessage() == "request fields accepted but ignored"]
    assert logged and "some_future_field" in logged[0].fields  # type: ignore[attr-defined]


def test_n_streams_and_legacy_functions(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=3, n=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=80, functions=[  # pre-tools API
        {"name": "add", "parameters": TOOLS[1]["function"]["parameters"]}], function_call={"name": "add"})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[1]["function"]["parameters"])


# ---- tools and constrained output -----------------------------------------------------------------
def _validate_calls(calls: list[Any], complete: bool = True) -> None:
    assert calls
    for k, call in enumerate(calls):
        assert call.id.startswith("call_") and call.type == "function"
        if not complete and k == len(calls) - 1:
            break  # cut off by max_tokens
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_choice_required_is_constrained_and_valid(client: openai.OpenAI) -> None:
    """A random model cannot call tools on its own; constrained, it always produces valid calls."""
    for model in (CHAT, LLAMA):
        for seed in (3, 4):
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                               tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                               max_tokens=200, temperature=0.8, seed=seed)
            c = r.choices[0]
            assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
            _validate_calls(c.message.tool_calls)
            assert not c.message.content
    # parallel calls: a weak model may chain many; every complete one is valid
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Weather?"}],
                                       tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0.8, seed=3)
    c = r.choices[0]
    assert c.finish_reason in ("tool_calls", "length")
    _validate_calls(c.message.tool_calls, complete=c.finish_reason == "tool_calls")


def test_named_tool_choice_streams_name_first_then_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True, temperature=0)
    deltas = [c for c in stream if c.choices and c.choices[0].delta.tool_calls]
    first = deltas[0].choices[0].delta.tool_calls[0]
    assert first.index == 0 and first.id and first.function.name == "get_weather"
    assert len(deltas) > 2  # arguments arrive in fragments
    args = "".join(d.choices[0].delta.tool_calls[0].function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(args), WEATHER_SCHEMA)


def test_required_streaming(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "add"}], tools=TOOLS[1:], tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, stream=True))
    calls: dict[int, dict[str, str]] = {}
    for ch in chunks:
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            entry = calls.setdefault(tc.index, {"name": "", "args": ""})
            if tc.function.name:
                assert not entry["args"]  # name before arguments
                entry["name"] = tc.function.name
            entry["args"] += tc.function.arguments or ""
    assert list(calls) == [0] and calls[0]["name"] == "add"
    jsonschema.validate(json.loads(calls[0]["args"]), TOOLS[1]["function"]["parameters"])
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]


def test_tool_choice_none_and_auto_give_text(client: openai.OpenAI) -> None:
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=CHAT, messages=HELLO, tools=TOOLS, tool_choice=choice,
                                           max_tokens=4)
        assert r.choices[0].message.tool_calls is None or choice == "auto"
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model=CHAT, messages=HELLO, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_response_format_json_object_and_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=200, temperature=0.7, seed=11,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": False}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=LLAMA, messages=HELLO, max_tokens=200, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x"}})


# ---- errors agents understand -----------------------------------------------------------------------
def test_context_overflow_message(srv: RunningServer, client: openai.OpenAI) -> None:
    limit = srv.server.manager.resolve(CHAT).model.engine.max_model_len  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=limit)
    n = prompt_len(srv, HELLO)
    assert (f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n + limit} tokens") in e.value.message
    long = [{"role": "user", "content": "word " * 300_000}]  # a 1.5 MB body
    with pytest.raises(openai.BadRequestError, match="maximum context length is"):
        client.chat.completions.create(model=CHAT, messages=long, max_tokens=4)


def test_unknown_model_is_404_listing_served_names(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=HELLO)
    assert "gpt-4o-mini" in e.value.message and CHAT in e.value.message
    assert e.value.body["type"] == "not_found_error"


def test_error_object_shape_everywhere_on_v1(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for resp in (h.post("/v1/chat/completions", content=b"{not json"),
                     h.post("/v1/chat/completions", json={"model": CHAT}),
                     h.post("/v1/chat/completions", json={"model": CHAT, "messages": HELLO, "temperature": 5}),
                     h.post("/v1/chat/completions", json={"model": "add", "messages": HELLO}),
                     h.get("/v1/no-such-route"),
                     h.post("/v1/completions", json={"model": CHAT, "prompt": [999999]})):
            assert 400 <= resp.status_code < 500, resp.text
            err = resp.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
        paths = h.get("/openapi.json").json()["paths"]
        assert {"/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/models"} <= set(paths)


def test_overload_is_429_rate_limit(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    root = build_llm_repo(tmp_path / "models", llm_models, only=[CHAT])
    with run_server(root, llm_max_pending=1) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        stream = c.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2)
        assert "rate limit" in e.value.message.lower()
        stream.close()


def test_client_disconnect_cancels_generation(srv: RunningServer, client: openai.OpenAI) -> None:
    llm = srv.server.llm
    stats = srv.server.manager.resolve(CHAT).model.engine.stats  # type: ignore[union-attr]
    before = stats["generated_tokens"]
    stream = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=900, stream=True,
                                            extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert llm._pending.get(CHAT) == 1
    stream.close()
    deadline = time.monotonic() + 10
    while llm._pending.get(CHAT) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm._pending.get(CHAT) == 0
    assert srv.server.manager.resolve(CHAT).inflight == 0
    time.sleep(0.5)
    assert stats["generated_tokens"] - before < 900  # stopped early, not run to the end


def test_disconnect_cancels_non_streaming_generation(srv: RunningServer) -> None:
    llm = srv.server.llm
    stats = srv.server.manager.resolve(CHAT).model.engine.stats  # type: ignore[union-attr]
    before = stats["generated_tokens"]
    # the tiny model writes ~1,800 tokens/s on a fast 2-core machine: give up reading well before
    # 1,000 tokens could be done (a 0.5 s read timeout let 900 finish there)
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 1000, "ignore_eos": True}
    with httpx.Client(timeout=httpx.Timeout(60, read=0.1)) as h, pytest.raises(httpx.ReadTimeout):
        h.post(srv.url + "/v1/chat/completions", json=body)
    deadline = time.monotonic() + 10
    while llm._pending.get(CHAT) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm._pending.get(CHAT) == 0
    time.sleep(0.5)
    assert stats["generated_tokens"] - before < 1000  # stopped early, not run to the end


# ---- concurrency --------------------------------------------------------------------------------------
def test_16_concurrent_streams_match_greedy_alone(srv: RunningServer) -> None:
    prompts = [[{"role": "user", "content": f"Request number {i}: tell me something."}] for i in range(16)]
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)
    alone = [c.chat.completions.create(model=CHAT, messages=p, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].message.content
             for p in prompts[:3]]

    async def run_all() -> list[tuple[str, str | None]]:
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)

        async def one(p: list[dict[str, Any]], delay: float) -> tuple[str, str | None]:
            await asyncio.sleep(delay)
            text, finish = "", None
            stream = await ac.chat.completions.create(model=CHAT, messages=p, max_tokens=16, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True})
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
            return text, finish

        try:
            return await asyncio.gather(*(one(p, i * 0.03) for i, p in enumerate(prompts)))
        finally:
            await ac.close()

    results = asyncio.run(run_all())
    assert all(f == "length" for _, f in results)
    assert [t for t, _ in results[:3]] == alone


# ---- completions ----------------------------------------------------------------------------------------
def test_completions(srv: RunningServer, client: openai.OpenAI) -> None:
    r = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    ids = tokenizer(srv)("Once upon a time")["input_ids"]
    by_ids = client.completions.create(model=CHAT, prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text
    echo = client.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True,
                                     logprobs=2, extra_body={"ignore_eos": True})
    assert echo.choices[0].text.endswith(r.choices[0].text) and echo.choices[0].text.startswith("Once")
    assert len(echo.choices[0].logprobs.tokens) == 5
    two = client.completions.create(model=CHAT, prompt=["a b", "c d"], max_tokens=3, n=2)
    assert sorted(c.index for c in two.choices) == [0, 1, 2, 3]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=CHAT, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == r.choices[0].text


# ---- reasoning ------------------------------------------------------------------------------------------
def test_reasoning_parser_splits_thinking(client: openai.OpenAI) -> None:
    on = client.chat.completions.create(model=THINK, messages=HELLO, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
    msg = on.choices[0].message
    assert getattr(msg, "reasoning_content", None) and not msg.content  # still thinking at max_tokens
    chunks = list(client.chat.completions.create(model=THINK, messages=HELLO, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                       for c in chunks if c.choices)
    assert streamed == msg.reasoning_content
    off = client.chat.completions.create(model=THINK, messages=HELLO, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True,
                                                     "chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content and not getattr(off.choices[0].message, "reasoning_content", None)
    # without a reasoning parser the same model's text passes through untouched
    raw = client.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert not getattr(raw.choices[0].message, "reasoning_content", None)


# ---- embeddings -----------------------------------------------------------------------------------------
def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=BERT, input=["hello world", "the weather in Paris"])
    assert [d.index for d in r.data] == [0, 1]
    dim = len(r.data[0].embedding)
    assert dim == 32 and abs(sum(x * x for x in r.data[0].embedding) - 1) < 1e-4  # normalised
    assert r.usage.prompt_tokens > 4 and r.usage.total_tokens == r.usage.prompt_tokens
    one = client.embeddings.create(model=BERT, input="hello world")
    assert one.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-5)
    b64 = client.embeddings.create(model=BERT, input="hello world", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    assert decoded.tolist() == pytest.approx(r.data[0].embedding, abs=1e-5)
    short = client.embeddings.create(model=BERT, input="hello world", dimensions=8)
    assert len(short.data[0].embedding) == 8
    with pytest.raises(openai.BadRequestError, match="embedding"):
        client.embeddings.create(model=CHAT, input="x")
    with pytest.raises(openai.BadRequestError, match="chat"):
        client.chat.completions.create(model=BERT, messages=HELLO)
