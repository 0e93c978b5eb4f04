"""The KServe v2 / Triton generate extension over REST (``/generate``, ``/generate_stream``) on a
tiny real chat model, with httpx and the openai client as the reference for the same generation."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from conftest import RunningServer
from inhouse.protocols.kserve_v2.generate_rest import (
    GENERATE_GUARD,
    GENERATE_STREAM_GUARD,
    generate_stream_texts,
    map_generate_texts,
)
from inhouse.security.pii import PieceTexts
from inhouse.security.pipeline import GUARD_ATTR
from llm_api_fixtures import CHAT

pytestmark = pytest.mark.timeout(300)
PROMPT = "The quick brown fox"
GREEDY = {"max_tokens": 8, "temperature": 0}


def _client(srv: RunningServer) -> httpx.Client:
    return srv.client(timeout=120)


def _sse(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def _expect(r: httpx.Response, status: int, code: int, *fragments: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["inhouse-error-code"] == str(code)
    msg = r.json()["error"]  # v2 error bodies
    assert msg.startswith(f"[{code}] "), msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_generate_matches_the_completions_api(llm_api_server: RunningServer) -> None:
    with _client(llm_api_server) as c:
        r = c.post(f"/v2/models/{CHAT}/generate", json={"text_input": PROMPT, "parameters": GREEDY, "id": "q1"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_name"] == CHAT and doc["model_version"] == "1" and doc["id"] == "q1"
        assert isinstance(doc["text_output"], str) and doc["text_output"]
        assert doc["finish_reason"] in ("length", "stop") and 0 < doc["completion_tokens"] <= 8
        assert doc["prompt_tokens"] > 0
        assert "generate" in c.get("/v2").json()["extensions"]
        ref = openai.OpenAI(base_url=llm_api_server.url + "/v1", api_key="none").completions.create(
            model=CHAT, prompt=PROMPT, max_tokens=8, temperature=0)
        assert doc["text_output"] == ref.choices[0].text  # the same engine, the same greedy text
        # a version in the path names the serving one; a one-element text_input batch is a prompt
        r1 = c.post(f"/v2/models/{CHAT}/versions/1/generate", json={"text_input": [PROMPT], "parameters": GREEDY})
        assert r1.status_code == 200 and r1.json()["text_output"] == doc["text_output"]


def test_generate_stream_sends_pieces_then_the_end(llm_api_server: RunningServer) -> None:
    with _client(llm_api_server) as c:
        whole = c.post(f"/v2/models/{CHAT}/generate", json={"text_input": PROMPT, "parameters": GREEDY}).json()
        with c.stream("POST", f"/v2/models/{CHAT}/generate_stream",
                      json={"text_input": PROMPT, "parameters": {**GREEDY, "stream": True}}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r.read().decode())
        assert len(events) >= 2
        assert all(e["model_name"] == CHAT and e["model_version"] == "1" for e in events)
        assert "".join(e["text_output"] for e in events) == whole["text_output"]
        assert [("finish_reason" in e) for e in events] == [False] * (len(events) - 1) + [True]
        assert events[-1]["text_output"] == "" and events[-1]["completion_tokens"] == whole["completion_tokens"]


def test_generate_with_chat_messages(llm_api_server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Hello there, how are you?"}]
    with _client(llm_api_server) as c:
        r = c.post(f"/v2/models/{CHAT}/generate", json={"messages": messages, "parameters": GREEDY})
        assert r.status_code == 200, r.text
        ref = openai.OpenAI(base_url=llm_api_server.url + "/v1", api_key="none").chat.completions.create(
            model=CHAT, messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        assert r.json()["text_output"] == ref.choices[0].message.content


@pytest.mark.parametrize(("path", "body", "status", "code", "fragments"), [
    (f"/v2/models/{CHAT}/generate", {"parameters": GREEDY}, 400, 2001, ["'text_input'"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": 5}, 400, 2001, ["'text_input' must be a string"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "hi", "messages": []}, 400, 2001, ["not both"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "hi", "parameters": [1]}, 400, 2001, ["'parameters'"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "hi", "parameters": {"max_tokens": "many"}}, 400, 2001,
     ["wrong type"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "hi", "parameters": {"stream": True}}, 400, 2001,
     ["generate_stream"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "hi", "parameters": {"priority": -1}}, 400, 2001, ["priority"]),
    (f"/v2/models/{CHAT}/generate", {"messages": "not json"}, 400, 2001, ["'messages'"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "hi", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]}, 400, 2001, ["'tools' needs 'messages'"]),
    (f"/v2/models/{CHAT}/generate", {"text_input": "word " * 5000}, 400, 2030, []),
    ("/v2/models/no-such-model/generate", {"text_input": "hi"}, 404, 1002, ["no-such-model"]),
    ("/v2/models/add/generate", {"text_input": "hi"}, 400, 2001, ["/v2/models/add/infer"]),
    (f"/v2/models/{CHAT}/versions/7/generate", {"text_input": "hi"}, 404, 1002, ["version 7"]),
    (f"/v2/models/{CHAT}/versions/x/generate", {"text_input": "hi"}, 400, 2001, ["positive integer"]),
    (f"/v2/models/{CHAT}/generate_stream", {"parameters": GREEDY}, 400, 2001, ["'text_input'"]),
    ("/v2/models/no-such-model/generate_stream", {"text_input": "hi"}, 404, 1002, []),
])
def test_bad_generate_requests(llm_api_server: RunningServer, path: str, body: Any, status: int, code: int,
                               fragments: list[str]) -> None:
    with _client(llm_api_server) as c:
        _expect(c.post(path, json=body), status, code, *fragments)


def test_malformed_bodies(llm_api_server: RunningServer) -> None:
    with _client(llm_api_server) as c:
        for path in (f"/v2/models/{CHAT}/generate", f"/v2/models/{CHAT}/generate_stream"):
            _expect(c.post(path, content=b"{not json"), 400, 2001)
            _expect(c.post(path, content=b"[1, 2]"), 400, 2001)
        assert c.post(f"/v2/models/{CHAT}/generate", json={"text_input": "still up", "parameters": GREEDY}
                      ).status_code == 200


def test_routes_declare_their_guards() -> None:
    from inhouse.protocols.kserve_v2.generate_rest import build_router

    guards = {r.path: getattr(r.endpoint, GUARD_ATTR) for r in build_router(None, None, 1024).routes}  # type: ignore[arg-type, attr-defined]
    assert guards["/v2/models/{model}/generate"] is GENERATE_GUARD
    assert guards["/v2/models/{model}/versions/{version}/generate_stream"] is GENERATE_STREAM_GUARD
    assert GENERATE_GUARD.scope == "infer" and GENERATE_GUARD.model == "path"
    # the request visitor reaches the prompt and chat contents
    doc: dict[str, Any] = {"text_input": "mail a@b.cn", "messages": [
        {"role": "user", "content": "x a@b.cn"}, {"role": "user", "content": [{"type": "text", "text": "a@b.cn"}]}]}
    map_generate_texts(doc, lambda t: t.replace("a@b.cn", "[EMAIL_1]"))
    assert doc == {"text_input": "mail [EMAIL_1]", "messages": [
        {"role": "user", "content": "x [EMAIL_1]"},
        {"role": "user", "content": [{"type": "text", "text": "[EMAIL_1]"}]}]}
    # the stream visitor joins a placeholder split over two events before restoring it
    pieces = PieceTexts(lambda t: t.replace("[EMAIL_1]", "a@b.cn"))
    first = generate_stream_texts({"model_name": "m", "text_output": "to [EMA"}, pieces)
    last = generate_stream_texts({"model_name": "m", "text_output": "IL_1]", "finish_reason": "stop"}, pieces)
    assert first[0]["text_output"] + last[0]["text_output"] == "to a@b.cn"
    assert last[0]["model_name"] == "m"


def test_security_applies_to_generate(tmp_path: Any, llm_models: dict[str, Any]) -> None:
    """Under auth: the infer scope and the key's model list (model from the path), and the
    model's content policy reading text_input through the route's visitor."""
    from conftest import run_server
    from inhouse.security.keys import KeyStore
    from llm_fixtures import write_llm_model

    root = tmp_path / "models"
    root.mkdir()
    write_llm_model(root, CHAT, llm_models["qwen2"], {"max_model_len": 256,
                                                      "policy": {"deny_patterns": ["(?i)forbidden"]}})
    data = tmp_path / "data"
    store = KeyStore(data)
    infer_key = store.create("app", ["infer"])[0]
    other_key = store.create("other", ["infer"], models=["some-other-model"])[0]
    store.close()
    body = {"text_input": PROMPT, "parameters": GREEDY}
    with run_server(root, auth=True, data_dir=data) as srv, _client(srv) as c:
        for path in (f"/v2/models/{CHAT}/generate", f"/v2/models/{CHAT}/generate_stream"):
            _expect(c.post(path, json=body), 401, 4001)
            _expect(c.post(path, json=body, headers={"authorization": f"Bearer {other_key}"}), 403, 4003)
            auth = {"authorization": f"Bearer {infer_key}"}
            assert c.post(path, json=body, headers=auth).status_code == 200
            _expect(c.post(path, json={"text_input": "a FORBIDDEN topic"}, headers=auth), 400, 5001)
