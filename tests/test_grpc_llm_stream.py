"""Chat / generation models streaming through KServe v2 gRPC ModelStreamInfer, with Triton's own
client (decoupled responses, the last marked ``triton_final_response``)."""

from __future__ import annotations

import json
import queue
from typing import Any

import numpy as np
import openai
import pytest

from conftest import RunningServer
from llm_api_fixtures import CHAT

grpcclient = pytest.importorskip("tritonclient.grpc")
pytestmark = pytest.mark.timeout(300)


def _bytes_input(name: str, text: str) -> Any:
    t = grpcclient.InferInput(name, [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return t


def _collect(srv: RunningServer, requests: list[tuple[str, str, str, dict[str, Any]]]) -> dict[str, list[Any]]:
    """Send (request id, input name, text, parameters) on one stream; responses by request id."""
    assert srv.grpc_target is not None
    client = grpcclient.InferenceServerClient(srv.grpc_target)
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for rid, name, text, params in requests:
            client.async_stream_infer(CHAT, [_bytes_input(name, text)], request_id=rid, parameters=params,
                                      enable_empty_final_response=False)
        out: dict[str, list[Any]] = {rid: [] for rid, *_ in requests}
        finals = 0
        while finals < len(requests):
            result, error = got.get(timeout=120)
            if error is not None:
                out.setdefault("errors", []).append(error)
                finals += 1
                continue
            resp = result.get_response()
            out[resp.id].append(result)
            if resp.parameters["triton_final_response"].bool_param:
                finals += 1
        return out
    finally:
        client.stop_stream()
        client.close()


def _text(results: list[Any]) -> str:
    return "".join(r.as_numpy("text_output")[0].decode() for r in results)


def test_chat_model_streams_over_grpc(llm_api_server: RunningServer) -> None:
    messages = json.dumps([{"role": "user", "content": "Hello there, how are you?"}])
    params = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    out = _collect(llm_api_server, [("chat", "messages", messages, params),
                                    ("raw", "text_input", "Once upon a time", params)])
    for rid in ("chat", "raw"):
        results = out[rid]
        assert len(results) >= 2  # text arrives piece by piece, then the final response
        final = results[-1].get_response()
        assert final.parameters["finish_reason"].string_param == "length"
        assert final.parameters["completion_tokens"].int64_param == 6
        assert all(not r.get_response().parameters["triton_final_response"].bool_param for r in results[:-1])
    # the same text as the OpenAI API gives for the same request
    c = openai.OpenAI(base_url=llm_api_server.url + "/v1", api_key="x", max_retries=0)
    chat = c.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hello there, how are you?"}],
                                     max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert _text(out["chat"]) == chat.choices[0].message.content
    raw = c.completions.create(model=CHAT, prompt="Once upon a time", max_tokens=6, temperature=0,
                               extra_body={"ignore_eos": True})
    assert _text(out["raw"]) == raw.choices[0].text


def test_bad_generation_request_is_an_error_on_a_live_stream(llm_api_server: RunningServer) -> None:
    out = _collect(llm_api_server, [("bad", "messages", "not json", {}),
                                    ("ok", "text_input", "hi", {"max_tokens": 2})])
    assert len(out.get("errors", [])) == 1 and "messages" in str(out["errors"][0])
    assert out["ok"] and out["ok"][-1].get_response().parameters["triton_final_response"].bool_param
