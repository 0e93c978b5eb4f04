"""A chat model's content policy and PII rules on KServe v2 gRPC ModelStreamInfer (decoupled
generation), with Triton's own client: ``allowed_tools`` over the ``tools`` input (5001,
audited), tool calls in a ``tool_calls`` output, and messages redacted before the model sees
them (the answer equals the plain model's answer to the redacted text)."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from conftest import RunningServer, run_server
from inhouse.security.audit import AuditLog
from llm_fixtures import write_llm_model

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.timeout(300)

GUARDED, PLAIN = "guarded-chat", "plain-chat"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo"]}}, "required": ["city"],
    "additionalProperties": False}}}
DROP = {"type": "function", "function": {"name": "drop_database", "parameters": {"type": "object"}}}
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("grpc-llm")
    common: dict[str, Any] = {"tool_call_parser": "hermes", "max_model_len": 512, "engine": {"max_num_seqs": 4}}
    write_llm_model(root / "models", GUARDED, llm_models["qwen2"], {
        **common, "policy": {"allowed_tools": ["get_weather"]}, "pii": {"inputs": True, "outputs": "restore"}})
    write_llm_model(root / "models", PLAIN, llm_models["qwen2"], common)
    with run_server(root / "models", data_dir=root / "data", audit=True) as srv:
        yield srv


def _bytes(name: str, text: str) -> Any:
    t = grpcclient.InferInput(name, [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return t


def _generate(srv: RunningServer, inputs: dict[str, str], params: dict[str, Any]) -> tuple[list[Any], Any]:
    """One generation request on its own stream: (responses, the stream's error or None)."""
    assert srv.grpc_target is not None
    client = grpcclient.InferenceServerClient(srv.grpc_target)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer(GUARDED, [_bytes(k, v) for k, v in inputs.items()], request_id="r1",
                                  parameters=params, enable_empty_final_response=False)
        results = []
        while True:
            result, error = got.get(timeout=120)
            if error is not None:
                return results, error
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None
    finally:
        client.stop_stream()
        client.close()


def _text(results: list[Any]) -> str:
    return "".join(r.as_numpy("text_output")[0].decode() for r in results if r.as_numpy("text_output") is not None)


def test_allowed_tools_on_grpc_generation(server: RunningServer) -> None:
    messages = json.dumps([{"role": "user", "content": "What is the weather in Paris?"}])
    results, error = _generate(server, {"messages": messages, "tools": json.dumps([WEATHER, DROP])}, GREEDY)
    assert error is not None and not results
    assert "5001" in str(error) and "drop_database" in str(error) and "INVALID_ARGUMENT" in str(error)
    # an allowed tool, forced: the call comes back in a tool_calls output
    results, error = _generate(server, {"messages": messages, "tools": json.dumps([WEATHER])},
                               {"max_tokens": 64, "temperature": 0.0, "tool_choice": "get_weather"})
    assert error is None, error
    calls = [json.loads(r.as_numpy("tool_calls")[0]) for r in results if r.as_numpy("tool_calls") is not None]
    assert len(calls) == 1 and calls[0][0]["function"]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0][0]["function"]["arguments"]), dict)
    final = results[-1].get_response().parameters
    assert final["finish_reason"].string_param == "tool_calls"
    # tools need a chat request; a malformed tools input is a clear error, never reaching the model
    for inputs in ({"text_input": "hi", "tools": json.dumps([WEATHER])}, {"messages": messages, "tools": "nope"}):
        results, error = _generate(server, inputs, GREEDY)
        assert error is not None and "tools" in str(error) and "[2001]" in str(error), error

    log = AuditLog(server.server.settings.data_dir)
    rows = [r for r in log.entries() if r["transport"] == "grpc" and r["code"] == 5001]
    assert log.verify().ok
    log.close()
    assert len(rows) == 1 and rows[0]["model"] == GUARDED and rows[0]["status"] == 400
    assert rows[0]["action"] == "infer.stream" and "drop_database" in (rows[0]["detail"] or "")


def test_pii_redacted_before_grpc_generation(server: RunningServer) -> None:
    """The guarded model's answer to a message with a phone number and an e-mail equals the
    plain model's answer to the message with placeholders: that is what the model saw."""
    results, error = _generate(server, {"messages": json.dumps([
        {"role": "user", "content": "Call 13800138000 or mail wang@example.cn please"}])}, GREEDY)
    assert error is None, error
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    plain = c.chat.completions.create(
        model=PLAIN, messages=[{"role": "user", "content": "Call [PHONE_1] or mail [EMAIL_1] please"}],
        max_tokens=6, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    assert _text(results) == plain
    raw, error = _generate(server, {"text_input": "Call 13800138000 now"}, GREEDY)
    assert error is None, error
    assert _text(raw) == c.completions.create(model=PLAIN, prompt="Call [PHONE_1] now", max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text
