"""inhouse chat against an OpenAI-compatible server speaking the real wire format (SSE
``chat.completion.chunk`` events). The stand-in server here is a few lines of Starlette so the
client is checked on its own: streaming, history, system prompt, sampling flags from the
client config, retries on 429 and error objects."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from typer.testing import CliRunner

from inhouse.cli import app

runner = CliRunner()


class OpenAIStandIn:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []

    def app(self) -> Starlette:
        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]})

        async def completions(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            if self.fail_next:
                status = self.fail_next.pop(0)
                return JSONResponse({"error": {"message": f"[3001] busy ({status})", "type": "rate_limit_error"}},
                                    status_code=status, headers={"retry-after": "0"})
            last = body["messages"][-1]["content"]
            if last == "boom":
                return JSONResponse({"error": {"message": "[5001] blocked by content policy",
                                               "type": "invalid_request_error"}}, status_code=400)
            words = ["you", " said", f" {last}", f" ({len(body['messages'])} messages)"]
            if not body.get("stream"):
                return JSONResponse({"id": "c1", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                     "finish_reason": "stop"}]})

            async def events() -> Any:
                first = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                yield f"data: {json.dumps(first)}\n\n"
                for w in words:
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.01)
                yield 'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},' \
                      '"finish_reason":"stop"}]}\n\n'
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", completions,
                                                                    methods=["POST"])])


@pytest.fixture
def openai_server() -> Iterator[tuple[str, OpenAIStandIn]]:
    stand_in = OpenAIStandIn()
    server = uvicorn.Server(uvicorn.Config(stand_in.app(), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", stand_in
    server.should_exit = True
    thread.join(10)


def test_streaming_chat_keeps_history_and_sends_sampling(openai_server: tuple[str, OpenAIStandIn],
                                                        tmp_path: Path) -> None:
    url, stand_in = openai_server
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"url: {url}\nmodel: tiny-chat\nsystem_prompt: Be brief.\nmax_tokens: 64\n"
                   "temperature: 0.2\ntop_p: 0.9\n")
    res = runner.invoke(app, ["chat", "--client-config", str(cfg), "-m", "hello", "-m", "again",
                              "--temperature", "0.5"])
    assert res.exit_code == 0, res.output
    assert "you said hello (2 messages)" in res.output
    assert "you said again (4 messages)" in res.output  # system + user + assistant + user
    first, second = stand_in.requests
    assert first["stream"] is True and first["model"] == "tiny-chat"
    assert first["max_tokens"] == 64 and first["temperature"] == 0.5 and first["top_p"] == 0.9  # flag wins
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "you said hello (2 messages)"}, {"role": "user", "content": "again"}]


def test_interactive_commands_and_model_discovery(openai_server: tuple[str, OpenAIStandIn]) -> None:
    url, stand_in = openai_server
    res = runner.invoke(app, ["chat", "--url", url, "--no-stream"],
                        input="one\n/reset\n/system Talk like a pirate.\ntwo\n/help\n/exit\nignored\n")
    assert res.exit_code == 0, res.output
    assert "you said one (1 messages)" in res.output and "you said two (2 messages)" in res.output
    assert stand_in.requests[0]["model"] == "tiny-chat"  # the server's first model
    assert stand_in.requests[-1]["messages"][0] == {"role": "system", "content": "Talk like a pirate."}
    assert "Commands:" in res.output and len(stand_in.requests) == 2


def test_retries_on_429_and_shows_error_objects(openai_server: tuple[str, OpenAIStandIn]) -> None:
    url, stand_in = openai_server
    stand_in.fail_next = [429, 503]
    res = runner.invoke(app, ["chat", "--url", url, "--model", "tiny-chat", "-m", "hi"])
    assert res.exit_code == 0, res.output
    assert "you said hi" in res.output and len(stand_in.requests) == 3
    stand_in.fail_next = [429, 429]
    res = runner.invoke(app, ["chat", "--url", url, "--model", "tiny-chat", "--retries", "1", "-m", "hi"])
    assert res.exit_code == 1 and "HTTP 429: [3001] busy" in res.output
    res = runner.invoke(app, ["chat", "--url", url, "--model", "tiny-chat", "-m", "boom"])
    assert res.exit_code == 1 and "HTTP 400: [5001] blocked by content policy" in res.output
    # interactive: an error is reported and the session goes on without the failed turn
    res = runner.invoke(app, ["chat", "--url", url, "--model", "tiny-chat"], input="boom\nok\n")
    assert res.exit_code == 0 and "[5001]" in res.output and "you said ok (1 messages)" in res.output
