"""Ollama's native API through the official ``ollama`` client (and raw httpx where the wire
format itself is the point), against a real server with tiny random chat models."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore
from llm_api_fixtures import BERT, CHAT, LLAMA, THINK, build_llm_repo
from llm_fixtures import write_llm_model

pytestmark = pytest.mark.timeout(600)

HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
GREEDY = {"temperature": 0, "seed": 7}
ADD_CALL = {
    "type": "object",
    "properties": {"name": {"const": "add"}, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}},
    "required": ["name", "parameters"], "additionalProperties": False,
}
ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def srv(llm_api_server: RunningServer) -> RunningServer:
    return llm_api_server


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120)


def prompt_len(srv: RunningServer, messages: list[dict[str, Any]], model: str = CHAT) -> int:
    engine = srv.server.manager.resolve(model).model.engine  # type: ignore[union-attr]
    return len(engine.apply_chat_template(messages, None, add_generation_prompt=True))


# ---- models ---------------------------------------------------------------------------------------
def test_version_tags_ps_show(client: ollama.Client) -> None:
    assert client._client.get("/api/version").json()["version"]
    names = {m.model for m in client.list().models}
    assert {CHAT, "gpt-4o-mini", LLAMA, THINK} <= names
    assert BERT not in names and "add" not in names  # tags lists the chat / generate models
    tag = next(m for m in client.list().models if m.model == CHAT)
    assert tag.size and tag.size > 0 and tag.digest and len(tag.digest) == 64 and tag.modified_at is not None
    running = {m.model: m for m in client.ps().models}
    assert {CHAT, LLAMA, BERT} <= set(running) and "gpt-4o-mini" not in running
    assert running[CHAT].context_length == 1024 and running[CHAT].expires_at.year == 9999  # type: ignore[union-attr]
    shown = client.show(CHAT)
    assert shown.capabilities is not None and {"completion", "tools"} <= set(shown.capabilities)
    assert "thinking" not in shown.capabilities
    assert shown.modelinfo is not None and 1024 in shown.modelinfo.values()
    assert shown.template and "im_start" in shown.template
    assert "thinking" in (client.show(THINK).capabilities or [])
    assert client.show(BERT).capabilities == ["embedding"]


# ---- chat ---------------------------------------------------------------------------------------
def test_chat_counts_durations_and_length(srv: RunningServer, client: ollama.Client) -> None:
    r = client.chat(model=CHAT, messages=HELLO, options={**GREEDY, "num_predict": 4})
    assert r.done and r.done_reason == "length" and r.eval_count == 4
    assert r.message.role == "assistant" and r.message.content
    assert r.prompt_eval_count == prompt_len(srv, HELLO)
    assert r.total_duration and r.prompt_eval_duration and r.eval_duration and r.load_duration is not None
    assert r.total_duration >= r.load_duration + r.prompt_eval_duration + r.eval_duration
    assert r.created_at and r.created_at.endswith("Z")


def test_chat_stream_matches_the_whole_answer(client: ollama.Client) -> None:
    whole = client.chat(model=CHAT, messages=HELLO, options={**GREEDY, "num_predict": 8})
    chunks = list(client.chat(model=CHAT, messages=HELLO, options={**GREEDY, "num_predict": 8}, stream=True))
    assert len(chunks) >= 3 and all(not c.done for c in chunks[:-1])
    last = chunks[-1]
    assert last.done and last.done_reason == whole.done_reason and last.eval_count == whole.eval_count
    assert last.message.content == "" and last.total_duration and last.eval_duration
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content


def test_stream_is_ndjson_by_default(srv: RunningServer) -> None:
    with httpx.Client(base_url=srv.url, timeout=60) as h, h.stream(
            "POST", "/api/chat", json={"model": CHAT, "messages": HELLO, "options": {"num_predict": 300}}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/x-ndjson")
        assert "content-encoding" not in resp.headers  # lines are never held back by compression
        lines = [json.loads(ln) for ln in resp.iter_lines() if ln]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] <= 300
    assert {"model", "created_at", "message", "done"} <= set(lines[0])


def test_openclaw_request_shape_is_accepted(srv: RunningServer) -> None:
    """What OpenClaw's ollama provider sends, unknown options and fields included."""
    body = {"model": LLAMA, "messages": HELLO, "tools": [ADD_TOOL], "stream": False,
            "options": {"num_predict": 3, "num_gpu": 1, "mirostat": 0}, "truncate": False, "shift": False,
            "think": False, "keep_alive": "5m", "some_future_field": {"x": 1}}
    with httpx.Client(base_url=srv.url, timeout=60) as h:
        r = h.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True and r.json()["eval_count"] <= 3


def test_tool_call_round_trip(client: ollama.Client) -> None:
    # the schema makes the random model write a llama3_json call, which the parser turns into one
    messages: list[Any] = [{"role": "user", "content": "What is 2 + 3?"}]
    r = client.chat(model=LLAMA, messages=messages, tools=[ADD_TOOL], format=ADD_CALL,
                    options={**GREEDY, "num_predict": 60})
    assert r.message.tool_calls, r.message
    call = r.message.tool_calls[0]
    assert call.function.name == "add" and set(call.function.arguments) == {"a", "b"}
    assert all(isinstance(v, int) for v in call.function.arguments.values())
    total = sum(call.function.arguments.values())
    messages += [r.message, {"role": "tool", "content": str(total), "tool_name": "add"}]
    follow = client.chat(model=LLAMA, messages=messages, tools=[ADD_TOOL], options={**GREEDY, "num_predict": 3})
    assert follow.done and follow.prompt_eval_count and follow.prompt_eval_count > r.prompt_eval_count  # type: ignore[operator]
    streamed = list(client.chat(model=LLAMA, messages=messages[:1], tools=[ADD_TOOL], format=ADD_CALL,
                                options={**GREEDY, "num_predict": 60}, stream=True))
    calls = [tc for c in streamed for tc in c.message.tool_calls or []]
    assert [tc.function.arguments for tc in calls] == [call.function.arguments]  # each call once, whole


def test_format_json_schema_and_json(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}, "days": {"type": "integer", "minimum": 1,
                                                                             "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "days", "unit"],
        "additionalProperties": False}
    r = client.chat(model=CHAT, messages=HELLO, format=schema, options={"num_predict": 200, "seed": 3})
    jsonschema.validate(json.loads(r.message.content or ""), schema)
    assert r.done_reason == "stop"
    g = client.generate(model=CHAT, prompt="Give me JSON.", format="json", options={"num_predict": 200, "seed": 3})
    assert isinstance(json.loads(g.response), dict)


def test_think(client: ollama.Client) -> None:
    r = client.chat(model=THINK, messages=HELLO, think=True, options={**GREEDY, "num_predict": 12})
    assert r.message.thinking and "<think>" not in (r.message.content or "")
    chunks = list(client.chat(model=THINK, messages=HELLO, think=True, options={**GREEDY, "num_predict": 12},
                              stream=True))
    assert "".join(c.message.thinking or "" for c in chunks) == r.message.thinking
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=CHAT, messages=HELLO, think=True)
    assert e.value.status_code == 400 and "thinking" in e.value.error


# ---- generate -----------------------------------------------------------------------------------
def test_generate_stream_raw_and_load(srv: RunningServer, client: ollama.Client) -> None:
    g = client.generate(model=CHAT, prompt="Once upon a time", system="Be brief.",
                        options={**GREEDY, "num_predict": 5, "stop": ["zzzz"], "top_k": 5, "top_p": 0.5,
                                 "repeat_penalty": 1.2})
    assert g.done and g.response and g.eval_count == 5 and g.done_reason == "length"
    assert g.prompt_eval_count == prompt_len(srv, [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Once upon a time"}])
    parts = list(client.generate(model=CHAT, prompt="Once upon a time", system="Be brief.",
                                 options={**GREEDY, "num_predict": 5, "stop": ["zzzz"], "top_k": 5, "top_p": 0.5,
                                          "repeat_penalty": 1.2}, stream=True))
    assert "".join(p.response for p in parts) == g.response and parts[-1].done
    raw = client.generate(model=CHAT, prompt="Once upon a time", raw=True, options={"num_predict": 3})
    tok = srv.server.manager.resolve(CHAT).model.engine.tokenizer  # type: ignore[union-attr]
    assert raw.prompt_eval_count == len(tok("Once upon a time")["input_ids"])
    loaded = client.generate(model=CHAT)  # Ollama's way to load a model: it is loaded already
    assert loaded.done and loaded.done_reason == "load"
    assert client.chat(model=CHAT, messages=[]).done_reason == "load"
    # keep_alive 0 is accepted, but a model other clients use stays loaded
    client.generate(model=CHAT, prompt="hi", keep_alive=0, options={"num_predict": 1, "presence_penalty": 0.5,
                                                                     "frequency_penalty": 0.5})
    assert CHAT in {m.model for m in client.ps().models}


# ---- embeddings ---------------------------------------------------------------------------------
def test_embed_and_legacy_embeddings(srv: RunningServer, client: ollama.Client) -> None:
    r = client.embed(model=BERT, input=["hello world", "the cat"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) > 8 and r.prompt_eval_count
    with httpx.Client(base_url=srv.url, timeout=60) as h:
        ref = h.post("/v1/embeddings", json={"model": BERT, "input": "hello world"}).json()["data"][0]["embedding"]
    assert r.embeddings[0] == pytest.approx(ref, abs=1e-5)
    short = client.embed(model=BERT, input="hello world", dimensions=4)
    assert len(short.embeddings[0]) == 4 and sum(x * x for x in short.embeddings[0]) == pytest.approx(1, abs=1e-4)
    legacy = client.embeddings(model=BERT, prompt="hello world")
    assert list(legacy.embedding) == pytest.approx(ref, abs=1e-5)


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input_in_ollamas_error_shape(srv: RunningServer, client: ollama.Client) -> None:
    with httpx.Client(base_url=srv.url, timeout=60) as h:
        r = h.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()) == {"error"} and r.headers["inhouse-error-code"] == "2001"
        r = h.post("/api/chat", json={"messages": HELLO})
        assert r.status_code == 400 and "'model'" in r.json()["error"]
        r = h.post("/api/generate", json={"model": CHAT, "prompt": "hi", "options": {"temperature": -1}})
        assert r.status_code == 400 and "temperature" in r.json()["error"]
        r = h.post("/api/chat", json={"model": CHAT, "messages": "hi"})
        assert r.status_code == 400 and "messages" in r.json()["error"]
        r = h.post("/api/chat", json={"model": CHAT, "messages": HELLO, "format": "yaml"})
        assert r.status_code == 400 and "format" in r.json()["error"]
        r = h.get("/api/no-such-route")
        assert r.status_code == 404 and set(r.json()) == {"error"}
    with pytest.raises(ollama.ResponseError) as e:  # nothing is pulled: models come from the repository
        client.pull(CHAT)
    assert e.value.status_code == 400 and "repository" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.delete(CHAT)
    assert e.value.status_code == 400 and CHAT in {m.model for m in client.list().models}
    bad: list[tuple[Any, int, str]] = [
        (lambda: client.chat(model="nope", messages=HELLO), 404, "model 'nope' not found"),
        (lambda: client.generate(model="nope", prompt="hi", stream=True).__next__(), 404, "not found"),
        (lambda: client.show("nope"), 404, "not found"),
        (lambda: client.embed(model=CHAT, input="x"), 400, "'chat' model"),
        (lambda: client.chat(model=CHAT, messages=[{"role": "user", "content": "what is this?", "images": ["aGk="]}]),
         400, "text only"),
        (lambda: client.generate(model=CHAT, prompt="what is this?", images=["aGk="]), 400, "text only"),
        (lambda: client.chat(model=CHAT, messages=HELLO, options={"num_ctx": 4096}), 400, "num_ctx"),
        (lambda: client.chat(model=CHAT, messages=HELLO, options={"num_ctx": 8}), 400, "num_ctx"),
        (lambda: client.chat(model=CHAT, messages=HELLO, stream=True, options={"num_ctx": 8}).__next__(), 400,
         "num_ctx"),
        (lambda: client.generate(model=CHAT, prompt="a b c d e f g h i j", raw=True, options={"num_ctx": 4}),
         400, "num_ctx"),
        (lambda: client.generate(model=CHAT, prompt="x", suffix="y"), 400, "suffix"),
        (lambda: client.chat(model=CHAT, messages=HELLO, options={"num_predict": 0}), 400, "num_predict"),
        (lambda: client.generate(model=CHAT, prompt="x", template="{{ .Prompt }}"), 400, "template"),
        (lambda: client.generate(model=CHAT, prompt="x", context=[1, 2, 3]), 400, "context"),
        (lambda: client.embed(model=BERT, input="word " * 3000), 400, "context length"),
    ]
    for call, status, text in bad:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == status and text in e.value.error, (status, text, e.value)
    assert client.chat(model=CHAT, messages=HELLO, options={"num_predict": 2}).done  # still serving


def test_num_ctx_bounds_the_answer(srv: RunningServer, client: ollama.Client) -> None:
    n = prompt_len(srv, HELLO)
    r = client.chat(model=CHAT, messages=HELLO, options={**GREEDY, "num_ctx": n + 3})
    assert r.eval_count == 3 and r.done_reason == "length"
    raw = client.generate(model=CHAT, prompt="Once upon a time", raw=True, options={**GREEDY, "num_ctx": 16})
    assert raw.prompt_eval_count and raw.eval_count == 16 - raw.prompt_eval_count and raw.done_reason == "length"


def test_client_disconnect_cancels_generation(srv: RunningServer) -> None:
    llm = srv.server.llm
    with httpx.Client(base_url=srv.url, timeout=60) as h, h.stream(
            "POST", "/api/chat", json={"model": CHAT, "messages": HELLO, "options": {"num_predict": 900}}) as resp:
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        assert llm._pending.get(CHAT) == 1
    deadline = time.monotonic() + 10
    while llm._pending.get(CHAT) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm._pending.get(CHAT) == 0


# ---- security -----------------------------------------------------------------------------------
PII_MODEL = "pii-chat"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> Iterator[
        tuple[RunningServer, dict[str, str]]]:
    root = build_llm_repo(tmp_path_factory.mktemp("ollama") / "models", llm_models, only=[BERT])
    write_llm_model(root, PII_MODEL, llm_models["qwen2"], {"max_model_len": 512, "engine": {"max_num_seqs": 4},
                                                           "pii": {"inputs": True, "outputs": "restore"},
                                                           "policy": {"deny_patterns": ["secret project"]}})
    data = root.parent / "data"
    store = KeyStore(data)
    keys = {"infer": store.create("app", ["infer"])[0],
            "bert_only": store.create("bert", ["infer"], models=[BERT])[0]}
    store.close()
    with run_server(root, auth=True, data_dir=data) as s:
        yield s, keys


def test_api_key_required_and_model_list_enforced(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, keys = secured
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=srv.url).chat(model=PII_MODEL, messages=HELLO)
    assert e.value.status_code == 401 and "API key" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=srv.url, headers={"Authorization": "Bearer ih_0123456789abcdef_nope"}).list()
    assert e.value.status_code == 401
    limited = ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {keys['bert_only']}"})
    with pytest.raises(ollama.ResponseError) as e:
        limited.chat(model=PII_MODEL, messages=HELLO, options={"num_predict": 2})
    assert e.value.status_code == 403 and PII_MODEL in e.value.error
    assert limited.embed(model=BERT, input="hi").embeddings
    ok = ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {keys['infer']}"})
    assert ok.chat(model=PII_MODEL, messages=HELLO, options={"num_predict": 2}).done
    with pytest.raises(ollama.ResponseError) as e:  # the model's content policy reads Ollama's texts
        ok.generate(model=PII_MODEL, prompt="tell me about the secret project", system="be brief")
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as e:
        ok.chat(model=PII_MODEL, messages=[{"role": "user", "content": "the secret project?"}],
                stream=True).__next__()
    assert e.value.status_code == 400


def test_pii_placeholders_restored_in_streamed_answer(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, keys = secured
    c = ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {keys['infer']}"}, timeout=120)
    # the model only ever sees the placeholder; the schema makes it write the placeholder back
    schema = {"type": "object", "properties": {"to": {"const": "[EMAIL_1]"}}, "required": ["to"],
              "additionalProperties": False}
    messages = [{"role": "user", "content": "Write to alice@example.com please."}]
    chunks = list(c.chat(model=PII_MODEL, messages=messages, format=schema, options={"num_predict": 60},
                         stream=True))
    pieces = [ch.message.content or "" for ch in chunks]
    assert len([p for p in pieces if p]) > 2  # streamed in pieces, the placeholder split between them
    assert json.loads("".join(pieces)) == {"to": "alice@example.com"}
    whole = c.generate(model=PII_MODEL, prompt="Write to alice@example.com please.", format=schema,
                       options={"num_predict": 60})
    assert json.loads(whole.response) == {"to": "alice@example.com"}


def test_ndjson_framing_restores_placeholders_split_across_lines_and_reads() -> None:
    from inhouse.protocols import ollama as adapter
    from inhouse.security.pii import Redactor, Vault
    from inhouse.security.pipeline import NdjsonStream, stream_framing

    assert stream_framing(b"application/x-ndjson; charset=utf-8") is NdjsonStream
    vault = Vault()
    assert Redactor().redact("mail a@b.io", vault) == "mail [EMAIL_1]"
    stream = NdjsonStream(vault.restore, adapter.stream_texts)
    pieces = ["Sure: [EM", "AIL", "_1", "] ok", ""]
    data = b"".join(json.dumps({"model": "m", "message": {"role": "assistant", "content": p},
                                "done": i == len(pieces) - 1}).encode() + b"\n" for i, p in enumerate(pieces))
    out = b"".join(stream.feed(data[i:i + 7], True) for i in range(0, len(data), 7)) + stream.feed(b"", False)
    docs = [json.loads(line) for line in out.split(b"\n") if line]
    assert len(docs) == len(pieces) and docs[-1]["done"] is True
    assert "".join(d["message"]["content"] for d in docs) == "Sure: a@b.io ok"


def test_error_after_the_stream_started_arrives_in_band(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    root = build_llm_repo(tmp_path / "models", llm_models, only=[CHAT])
    with run_server(root, llm_timeout_s=0.2) as s:
        c = ollama.Client(host=s.url, timeout=60)
        got: list[Any] = []
        with pytest.raises(ollama.ResponseError, match="deadline"):
            for chunk in c.chat(model=CHAT, messages=HELLO, options={**GREEDY, "num_predict": 1000}, stream=True):
                got.append(chunk)
        assert got and not any(ch.done for ch in got)  # pieces came first, then the error line
