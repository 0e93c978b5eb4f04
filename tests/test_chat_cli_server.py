"""`inhouse chat` against a real inhouse server with a real (tiny) chat model: the CLI and the
OpenAI-compatible route agree on the wire format, streaming and not."""

from __future__ import annotations

import openai
from typer.testing import CliRunner

from conftest import RunningServer
from inhouse.cli import app
from llm_api_fixtures import CHAT

runner = CliRunner()


def test_one_shot_chat_matches_the_api(llm_api_server: RunningServer) -> None:
    url = llm_api_server.url
    expected = openai.OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hello there"}], max_tokens=8, temperature=0,
    ).choices[0].message.content
    assert expected
    for stream in ("--stream", "--no-stream"):
        result = runner.invoke(app, ["chat", "--url", url, "--model", CHAT, "--message", "hello there",
                                     "--max-tokens", "8", "--temperature", "0", stream])
        assert result.exit_code == 0, result.output
        assert expected.strip() in result.stdout, (stream, result.stdout)


def test_unknown_model_is_a_clear_error(llm_api_server: RunningServer) -> None:
    result = runner.invoke(app, ["chat", "--url", llm_api_server.url, "--model", "no-such-model",
                                 "--message", "hi"])
    assert result.exit_code != 0
    assert "no-such-model" in result.output
