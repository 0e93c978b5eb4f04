"""The response cache on the LLM APIs: a deterministic chat (temperature 0, or a seed) is
answered once by the model, then from the cache — also as a stream, replayed from the same
events; sampled requests are never looked up."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import run_server
from llm_fixtures import write_llm_model


def _cache(c: httpx.Client) -> tuple[int, int]:
    s = c.get("/v2/models/tiny-llama/stats").json()["model_stats"][0]["inference_stats"]
    return s["cache_hit"]["count"], s["cache_miss"]["count"]


def _stream_text(c: httpx.Client, body: dict[str, object]) -> str:
    text = ""
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def test_chat_cached_at_temperature_zero(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    repo = tmp_path / "models"
    write_llm_model(repo, "tiny-llama", llm_models["llama"], {
        "max_model_len": 512, "response_cache": {"enabled": True},
        "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 256}})
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello there"}],
            "temperature": 0, "max_tokens": 8}
    with run_server(repo) as srv, srv.client(timeout=120) as c:
        first = c.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        second = c.post("/v1/chat/completions", json=body)
        assert second.json()["choices"] == first.json()["choices"]
        assert second.json()["usage"] == first.json()["usage"]
        assert second.json()["id"] != first.json()["id"]  # its own answer, with the cached content
        assert _cache(c) == (1, 1)
        # a stream of the same request is replayed from the cached events
        assert _stream_text(c, body) == first.json()["choices"][0]["message"]["content"]
        assert _cache(c) == (2, 1)
        # a different request, and a no-cache one, reach the model
        assert c.post("/v1/chat/completions", json={**body, "max_tokens": 4}).status_code == 200
        assert _cache(c) == (2, 2)
        r = c.post("/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})
        assert r.status_code == 200 and _cache(c) == (2, 2)
        # sampling without a seed is not deterministic: never looked up; with a seed it is
        for _ in range(2):
            assert c.post("/v1/chat/completions", json={**body, "temperature": 0.9}).status_code == 200
        assert _cache(c) == (2, 2)
        for _ in range(2):
            assert c.post("/v1/chat/completions", json={**body, "temperature": 0.9, "seed": 7}).status_code == 200
        assert _cache(c) == (3, 3)
        # the Anthropic API shares the service and its cache: the same request finds the events the
        # OpenAI answer left, rendered as a Messages answer
        msg = {"model": "tiny-llama", "max_tokens": 8, "temperature": 0,
               "messages": [{"role": "user", "content": "hello there"}]}
        a1 = c.post("/v1/messages", json=msg)
        assert a1.status_code == 200 and a1.json()["content"][0]["text"] == first.json()["choices"][0][
            "message"]["content"]
        assert _cache(c) == (4, 3)
        other = {**msg, "messages": [{"role": "user", "content": "good morning"}]}
        a2, a3 = c.post("/v1/messages", json=other), c.post("/v1/messages", json=other)
        assert a2.status_code == a3.status_code == 200 and a2.json()["content"] == a3.json()["content"]
        assert _cache(c) == (5, 4)
        # v2 infer on a chat model samples with the model's defaults: never cached
        v2 = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello there"]}]}
        for _ in range(2):
            assert c.post("/v2/models/tiny-llama/infer", json=v2).status_code == 200
        assert _cache(c) == (5, 4)
        # a forced tool call is cached with its arguments, but every answer gets its own call id
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        call = {**body, "tools": tools, "tool_choice": "required", "max_tokens": 40}
        t1, t2 = c.post("/v1/chat/completions", json=call), c.post("/v1/chat/completions", json=call)
        assert t1.status_code == t2.status_code == 200, t1.text
        assert _cache(c) == (6, 5)
        c1, c2 = (r.json()["choices"][0]["message"]["tool_calls"][0] for r in (t1, t2))
        assert c1["function"] == c2["function"] and c1["function"]["name"] == "get_weather"
        assert c1["id"] != c2["id"]
