"""The OpenAI Responses API through the official ``openai`` SDK (``client.responses``) and raw
httpx where the wire format itself is the point, against a real server with tiny random chat
models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore
from llm_api_fixtures import CHAT, LLAMA, THINK
from llm_fixtures import write_llm_model

pytestmark = pytest.mark.timeout(600)

ADD_TOOL = {"type": "function", "name": "add", "description": "Add two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                     "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}
KEY = "sk-responses"  # without --auth any key works; stored responses are still kept per key
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def srv(llm_api_server: RunningServer) -> RunningServer:
    return llm_api_server


@pytest.fixture(scope="module")
def client(srv: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _events(srv: RunningServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a streamed response, read off the wire."""
    out = []
    with srv.client(headers={"authorization": f"Bearer {KEY}"}) as c, \
            c.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def _runs(names: list[str]) -> list[str]:
    """Event names with repeats in a row collapsed."""
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


# ---- text -----------------------------------------------------------------------------------------
def test_create_text_usage_and_store(client: openai.OpenAI) -> None:
    r = client.responses.create(model=CHAT, input="Hello there, how are you?", instructions="Be brief.",
                                max_output_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == CHAT
    assert r.status == "incomplete" and r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage and r.usage.output_tokens == 6 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 6 and r.usage.input_tokens_details.cached_tokens >= 0
    # stored by default: retrievable, then deletable
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.responses.retrieve(r.id)


def test_completed_status_when_the_model_stops(client: openai.OpenAI) -> None:
    r = client.responses.create(model=CHAT, input=[{"role": "user", "content": "Hi"}], max_output_tokens=400,
                                temperature=0.7, top_p=0.9)
    assert r.status in ("completed", "incomplete")  # a random model may not stop, but usually does
    assert r.usage and r.usage.output_tokens <= 400
    if r.status == "completed":
        assert r.incomplete_details is None and r.output[0].status == "completed"


def test_stream_event_sequence(srv: RunningServer, client: openai.OpenAI) -> None:
    body = {"model": CHAT, "input": "Hello there", "max_output_tokens": 5, "temperature": 0, "ignore_eos": True,
            "store": False}
    events = _events(srv, body)
    names = [n for n, _ in events]
    assert names[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert all(d["type"] == n for n, d in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert events[-4][1]["text"] == text
    final = events[-1][1]["response"]
    assert final["usage"]["output_tokens"] == 5 and final["output"][0]["content"][0]["text"] == text
    assert final["id"] == events[0][1]["response"]["id"]
    # the same through the SDK, raw events and the accumulating helper
    sdk = list(client.responses.create(**{k: v for k, v in body.items() if k != "ignore_eos"}, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert _runs([e.type for e in sdk]) == _runs(names)  # deltas may be cut differently
    # the SDK's accumulating helper checks item identities and wants response.completed
    person = {"format": {"type": "json_schema", "name": "person", "schema": PERSON}}
    with client.responses.stream(model=LLAMA, input="Hello there, how are you?", max_output_tokens=200,
                                 temperature=1.0, store=False, extra_body={"seed": 1}, text=person) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        done = stream.get_final_response()
    assert done.status == "completed" and done.output_text == "".join(deltas)
    jsonschema.validate(json.loads(done.output_text), PERSON)
    # store: false keeps nothing; a stored stream is retrievable once complete
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(final["id"])
    stored = _events(srv, {**body, "store": True})[-1][1]["response"]
    assert client.responses.retrieve(stored["id"]).output_text == stored["output"][0]["content"][0]["text"]


def test_reasoning_items_from_think_tags(srv: RunningServer, client: openai.OpenAI) -> None:
    r = client.responses.create(model=THINK, input="Hello there", max_output_tokens=8, temperature=0,
                                reasoning={"effort": "medium"}, extra_body={"ignore_eos": True})
    kinds = [o.type for o in r.output]
    assert kinds[0] == "reasoning"  # still thinking at the token limit
    reasoning = r.output[0].content[0].text  # type: ignore[union-attr]
    assert reasoning
    events = _events(srv, {"model": THINK, "input": "Hello there", "max_output_tokens": 8, "temperature": 0,
                           "ignore_eos": True, "store": False})
    streamed = "".join(d["delta"] for n, d in events if n == "response.reasoning_text.delta")
    assert streamed == reasoning
    assert events[2][1]["item"]["type"] == "reasoning"
    off = client.responses.create(model=THINK, input="Hello there", max_output_tokens=8, temperature=0,
                                  reasoning={"effort": "none"}, extra_body={"ignore_eos": True})
    assert [o.type for o in off.output] == ["message"] and off.output_text


def test_earlier_turns_as_items_equal_chat_messages(srv: RunningServer, client: openai.OpenAI) -> None:
    """Assistant output_text turns and reasoning items in ``input`` render like the chat
    completion's messages: same prompt, so the same greedy answer."""
    items = [{"role": "user", "content": "Hello there"},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
             {"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "input_text", "text": "How"},
                                          {"type": "input_text", "text": "are you?"}]}]
    r = client.responses.create(model=CHAT, input=items, max_output_tokens=4, temperature=0, store=False,
                                extra_body={"ignore_eos": True})
    chat = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
        model=CHAT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}, messages=[
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi!", "reasoning_content": "hm"},  # type: ignore[misc]
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "How\nare you?"}])
    assert r.output_text == chat.choices[0].message.content


# ---- tools ----------------------------------------------------------------------------------------
def test_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(model=CHAT, input="Add 2 and 3.", tools=[ADD_TOOL],
                                    tool_choice={"type": "function", "name": "add"}, max_output_tokens=120,
                                    temperature=0)
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].call_id
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, ADD_TOOL["parameters"])
    # stateless: the call and its output sent back as input items
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": str(args["a"] + args["b"])}
    final = client.responses.create(
        model=CHAT, tools=[ADD_TOOL], tool_choice="none", max_output_tokens=6, temperature=0, store=False,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Add 2 and 3."}]},
               calls[0].model_dump(exclude_none=True), result], extra_body={"ignore_eos": True})
    assert [o.type for o in final.output] == ["message"] and final.output_text
    # stateful: only the output, after previous_response_id
    chained = client.responses.create(model=CHAT, previous_response_id=first.id, input=[result], tools=[ADD_TOOL],
                                      tool_choice="none", max_output_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert chained.previous_response_id == first.id and chained.output_text == final.output_text


def test_required_tool_call_streams_arguments(srv: RunningServer) -> None:
    events = _events(srv, {"model": CHAT, "input": "add", "tools": [ADD_TOOL], "tool_choice": "required",
                           "parallel_tool_calls": False, "max_output_tokens": 120, "store": False})
    names = [n for n, _ in events]
    added = next(d for n, d in events if n == "response.output_item.added")
    assert added["item"]["type"] == "function_call" and added["item"]["name"] == "add"
    deltas = [d for n, d in events if n == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and all(d["item_id"] == added["item"]["id"] for d in deltas)
    done = next(d for n, d in events if n == "response.function_call_arguments.done")
    assert done["arguments"] == "".join(d["delta"] for d in deltas)
    jsonschema.validate(json.loads(done["arguments"]), ADD_TOOL["parameters"])
    assert names[-1] == "response.completed"
    item = events[-1][1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["arguments"] == done["arguments"]


# ---- structured output ----------------------------------------------------------------------------
def test_json_schema_and_json_object(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        r = client.responses.create(model=LLAMA, input="Hello there, how are you?", max_output_tokens=200,
                                    temperature=1.0, store=False, extra_body={"seed": seed},
                                    text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                     "strict": True}})
        assert r.status == "completed"
        jsonschema.validate(json.loads(r.output_text), PERSON)
        assert r.text and r.text.format and r.text.format.type == "json_schema"
    r = client.responses.create(model=CHAT, input="Hello there, how are you?", max_output_tokens=200,
                                temperature=0.7, store=False, text={"format": {"type": "json_object"}},
                                extra_body={"seed": 11})
    assert r.status == "completed" and isinstance(json.loads(r.output_text), dict)


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_input(srv: RunningServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=r"call_nope.*matches no function_call") as e:
        client.responses.create(model=CHAT, input=[
            {"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "call_nope", "output": "1"}])
    assert e.value.body["param"] == "input[1].call_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError, match=r"does not exist.*Served models") as e:
        client.responses.create(model="no-such-model", input="hi")
    assert e.value.body["code"] == "1002"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError, match="not found") as e:
        client.responses.create(model=CHAT, input="hi", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    bad_bodies: list[tuple[dict[str, Any], str]] = [
        ({"model": CHAT, "input": [42]}, "input[0] must be an object"),
        ({"model": CHAT, "input": [{"type": "bogus"}]}, "input[0].type 'bogus' is not supported"),
        ({"model": CHAT, "input": [{"role": "robot", "content": "x"}]}, "input[0].role must be"),
        ({"model": CHAT, "input": [{"role": "user", "content": [{"type": "weird"}]}]}, "unknown part type 'weird'"),
        ({"model": CHAT, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "accepts text only"),
        ({"model": CHAT, "input": [{"type": "function_call", "name": "add"}]}, "needs a 'call_id'"),
        ({"model": CHAT, "input": "hi", "tools": [{"type": "web_search"}]}, "function tools only"),
        ({"model": CHAT, "input": "hi", "tool_choice": "required"}, "needs 'tools'"),
        ({"model": CHAT, "input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice must be"),
        ({"model": CHAT, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "schema"),
        ({"model": CHAT}, "'input' is required"),
        ({"model": CHAT, "input": []}, "'input' is empty"),
        ({"model": CHAT, "input": [{"type": "function_call_output", "call_id": "c", "output": 5}]}, "matches no"),
        ({"model": CHAT, "input": "hi", "previous_response_id": 5}, "previous_response_id"),
        ({"model": CHAT, "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": CHAT, "input": "hi", "background": True}, "background"),
        ({"input": "hi"}, "model"),
    ]
    with srv.client() as c:
        for body, message in bad_bodies:
            r = c.post("/v1/responses", json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert message in err["message"] and err["type"] == "invalid_request_error", (body, err)
        r = c.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "2001"
        # unknown fields are accepted (and logged)
        r = c.post("/v1/responses", json={"model": CHAT, "input": "hi", "max_output_tokens": 2, "store": False,
                                          "some_future_field": {"x": 1}})
        assert r.status_code == 200, r.text
        assert c.delete("/v1/responses/resp_nope").status_code == 404
    # the server is still fine
    assert client.responses.create(model=CHAT, input="hi", max_output_tokens=2, store=False).output


def test_store_is_per_key(srv: RunningServer) -> None:
    mine = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-alice", max_retries=0, timeout=120)
    theirs = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-bob", max_retries=0, timeout=120)
    r = mine.responses.create(model=CHAT, input="secret plans", max_output_tokens=3)
    assert mine.responses.retrieve(r.id).id == r.id
    with pytest.raises(openai.NotFoundError) as e:
        theirs.responses.retrieve(r.id)
    assert "secret" not in str(e.value.body)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        theirs.responses.create(model=CHAT, input="more", previous_response_id=r.id, max_output_tokens=2)
    mine.responses.delete(r.id)


@pytest.fixture(scope="module")
def guarded_srv(tmp_path_factory: pytest.TempPathFactory,
                llm_models: dict[str, Path]) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    """API keys on; the chat model has a content policy and PII redaction."""
    tmp = tmp_path_factory.mktemp("guarded")
    root = tmp / "models"
    root.mkdir()
    write_llm_model(root, CHAT, llm_models["qwen2"], {
        "max_model_len": 1024, "policy": {"deny_patterns": ["secret project"], "allowed_tools": ["add"]},
        "pii": {"inputs": True, "outputs": "restore"}})
    store = KeyStore(tmp / "data")
    keys = {name: store.create(name, [scope])[0]
            for name, scope in (("alice", "infer"), ("bob", "infer"), ("prom", "metrics"))}
    store.close()
    with run_server(root, auth=True, data_dir=tmp / "data") as s:
        yield s, keys


def test_store_with_auth_keys(guarded_srv: tuple[RunningServer, dict[str, str]]) -> None:
    s, keys = guarded_srv
    a, b = (openai.OpenAI(base_url=s.url + "/v1", api_key=keys[n], max_retries=0, timeout=120)
            for n in ("alice", "bob"))
    r = a.responses.create(model=CHAT, input="hello", max_output_tokens=3)
    follow = a.responses.create(model=CHAT, input="and?", previous_response_id=r.id, max_output_tokens=3)
    assert follow.previous_response_id == r.id
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.create(model=CHAT, input="x", previous_response_id=r.id, max_output_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).responses.retrieve(r.id)
    with pytest.raises(openai.PermissionDeniedError):  # the GET route needs the infer scope too
        openai.OpenAI(base_url=s.url + "/v1", api_key=keys["prom"], max_retries=0).responses.retrieve(r.id)
    assert a.responses.retrieve(r.id).id == r.id
    with httpx.Client(base_url=s.url) as c:
        assert c.get(f"/v1/responses/{r.id}").status_code == 401
        assert c.post("/v1/responses", json={"model": CHAT, "input": "hi"}).status_code == 401


def test_policy_reads_input_items_instructions_and_tools(guarded_srv: tuple[RunningServer, dict[str, str]]) -> None:
    s, keys = guarded_srv
    c = openai.OpenAI(base_url=s.url + "/v1", api_key=keys["alice"], max_retries=0, timeout=120)
    blocked: list[dict[str, Any]] = [
        {"input": "tell me about the secret project"},
        {"input": "hi", "instructions": "mention the secret project"},
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "the secret project?"}]}]},
        {"input": [{"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "c1", "output": "the secret project"}]},
        {"input": "hi", "tools": [{"type": "function", "name": "delete_database", "parameters": {}}]},
    ]
    for extra in blocked:
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model=CHAT, max_output_tokens=2, **extra)
        assert e.value.body["code"] == "5001", extra  # type: ignore[index]
    # PII in the input is redacted before the model sees it; the request still works
    r = c.responses.create(model=CHAT, input="mail a@b.io or call 13800138000", max_output_tokens=3)
    assert r.output
    events = []
    with httpx.Client(base_url=s.url, headers={"authorization": f"Bearer {keys['alice']}"}, timeout=60) as h, \
            h.stream("POST", "/v1/responses", json={"model": CHAT, "input": "mail a@b.io", "stream": True,
                                                    "max_output_tokens": 3, "store": False}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")


def test_streamed_placeholders_are_restored_across_deltas() -> None:
    from inhouse.protocols import openai_responses
    from inhouse.security.pii import Redactor, Vault
    from inhouse.security.pipeline import SseStream

    vault = Vault()
    assert Redactor().redact("call 13800138000 or mail a@b.io", vault) == "call [PHONE_1] or mail [EMAIL_1]"
    stream = SseStream(vault.restore, openai_responses.stream_texts)

    def send(doc: dict[str, Any]) -> list[dict[str, Any]]:
        data = b"event: " + doc["type"].encode() + b"\ndata: " + json.dumps(doc).encode() + b"\n\n"
        return [json.loads(line[6:]) for line in stream.transform(data).split(b"\n") if line.startswith(b"data: ")]

    item = {"output_index": 0, "content_index": 0, "item_id": "msg_1"}
    out: list[dict[str, Any]] = []
    for i, piece in enumerate(["Sure: ", "[PH", "ONE", "_1", "] and [", "EMAIL_1"]):
        out += send({"type": "response.output_text.delta", "sequence_number": 3 + i, "delta": piece, **item})
    # the last piece is held until the part ends: flushed in a delta before output_text.done
    out += send({"type": "response.output_text.done", "sequence_number": 9, "text": "Sure: [PHONE_1] and [EMAIL_1",
                 **item})
    out += send({"type": "response.completed", "sequence_number": 10, "response": {
        "id": "resp_13800138000", "output": [{"id": "msg_1", "type": "message", "content": [
            {"type": "output_text", "text": "[EMAIL_1]"}]}]}})
    deltas = [d["delta"] for d in out if d["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "Sure: 13800138000 and [EMAIL_1"
    assert [d["type"] for d in out[-3:]] == ["response.output_text.delta", "response.output_text.done",
                                             "response.completed"]
    assert out[-2]["text"] == "Sure: 13800138000 and [EMAIL_1"
    final = out[-1]["response"]
    assert final["id"] == "resp_13800138000" and final["output"][0]["content"][0]["text"] == "a@b.io"


# ---- what agents trip over --------------------------------------------------------------------------
def test_unknown_route_is_not_an_unknown_model(srv: RunningServer) -> None:
    with srv.client() as c:
        r = c.post("/v1/foo", json={"model": CHAT})
        assert r.status_code == 404 and r.headers["inhouse-error-code"] == "2004"
        err = r.json()["error"]
        assert err["code"] == "2004" and err["type"] == "not_found_error"
        assert err["message"].startswith("No such endpoint: POST /v1/foo. inhouse serves")
        assert "POST /v1/chat/completions" in err["message"] and "POST /v1/responses" in err["message"]
        r = c.post("/v1/messages/foo", json={})  # Anthropic's shape on its path
        body = r.json()
        assert r.status_code == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
        assert body["error"]["message"].startswith("[2004] No such endpoint: POST /v1/messages/foo")
        r = c.get("/v2/nothing/here")  # KServe v2's
        assert r.status_code == 404 and r.headers["inhouse-error-code"] == "2004"
        assert set(r.json()) == {"error"} and r.json()["error"].startswith("[2004] No such endpoint: GET /v2/nothing")
        r = c.get("/elsewhere")
        assert r.status_code == 404 and "/v1, /v2" in r.json()["error"]
        # an unknown model keeps its own code
        r = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "1002"


def test_image_part_for_an_unknown_model_names_the_model(srv: RunningServer) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]}
    anth = {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}
    resp = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AA"}]}]}
    with srv.client() as c:
        for path, body in (("/v1/chat/completions", chat), ("/v1/messages", anth), ("/v1/responses", resp)):
            r = c.post(path, json={**body, "model": "gpt-5-vision"})
            assert r.status_code == 404 and r.headers["inhouse-error-code"] == "1002", (path, r.text)
            assert "gpt-5-vision" in r.text and CHAT in r.text, r.text  # the served names
            r = c.post(path, json={**body, "model": CHAT})
            assert r.status_code == 400 and "accepts text only" in r.text, (path, r.text)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_models_list_is_503_while_startup_loading_runs(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    import threading

    import yaml

    from gate_backend import GATES, Gate

    root = tmp_path / "models"
    write_llm_model(root, CHAT, llm_models["qwen2"], {"max_model_len": 1024})
    # loaded first (names load in order), its warm-up held until the test lets it go
    (root / "a-held" / "1").mkdir(parents=True)
    (root / "a-held" / "model.yaml").write_text(yaml.safe_dump(
        {"name": "a-held", "backend": "gate", "warmup": {"samples": 1}}))
    GATES["a-held"] = gate = Gate()
    gate.hold()
    port, running, stop = _free_port(), threading.Event(), threading.Event()

    def serve() -> None:
        with run_server(root, http_port=port):
            running.set()
            stop.wait(120)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(500):  # until the socket answers
                try:
                    r = c.get("/v1/models")
                    break
                except httpx.TransportError:
                    threading.Event().wait(0.02)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            err = r.json()["error"]
            assert err["code"] == "3005" and "still loading" in err["message"]
            assert gate.entered.acquire(timeout=30)  # the warm-up is running
            assert c.get("/v1/models").status_code == 503
            gate.open.set()
            assert running.wait(120)
            r = c.get("/v1/models")
            assert r.status_code == 200 and CHAT in {m["id"] for m in r.json()["data"]}
    finally:
        gate.open.set()
        stop.set()
        thread.join(60)


def test_failure_after_the_stream_started_is_reported_in_band(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    root = tmp_path / "models"
    write_llm_model(root, CHAT, llm_models["qwen2"], {"max_model_len": 1024})
    # well under the time the tiny model needs for 1,000 tokens (see test_openai_api's deadline test)
    with run_server(root, llm_timeout_s=0.2) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            c.responses.create(model=CHAT, input="hi", max_output_tokens=1000, extra_body={"ignore_eos": True})
        assert e.value.status_code == 504 and e.value.body["code"] == "3002"  # type: ignore[index]
        events = list(c.responses.create(model=CHAT, input="hi", max_output_tokens=1000, stream=True,
                                         extra_body={"ignore_eos": True}))
        assert events[0].type == "response.created" and [e.type for e in events[-2:]] == ["error", "response.failed"]
        assert events[-2].code == "3002" and "deadline" in events[-2].message  # type: ignore[union-attr]
        failed = events[-1].response  # type: ignore[union-attr]
        assert failed.status == "failed" and failed.error and failed.error.code == "3002"
        assert [e.sequence_number for e in events] == list(range(len(events)))
        with pytest.raises(openai.NotFoundError):  # a failed response is not stored
            c.responses.retrieve(failed.id)


def test_store_is_bounded_in_count_and_bytes() -> None:
    from inhouse.protocols.openai_responses import ResponseStore, Stored

    store = ResponseStore(max_count=3, max_bytes=10_000)
    for i in range(5):
        store.put(f"resp_{i}", Stored("me", {"id": f"resp_{i}"}, [{"role": "user", "content": "x"}]))
    assert len(store) == 3 and store.get("resp_4", "me").doc["id"] == "resp_4"
    with pytest.raises(Exception, match="not found"):
        store.get("resp_0", "me")  # the oldest went first
    store.put("resp_big", Stored("me", {"id": "resp_big"}, [{"role": "user", "content": "y" * 9_950}]))
    assert len(store) < 3 and store.get("resp_big", "me")  # the big one pushed older ones out
    store.put("resp_huge", Stored("me", {"id": "resp_huge"}, [{"role": "user", "content": "z" * 20_000}]))
    assert len(store) == 0  # one response larger than the whole store is not kept
