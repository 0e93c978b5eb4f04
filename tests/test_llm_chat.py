"""Chat message normalisation (what agents send → what chat templates expect)."""

from __future__ import annotations

import pytest

from inhouse.errors import InvalidRequestError
from inhouse.llm.chat import merge_consecutive, normalize_messages, normalize_tools
from inhouse.protocols.anthropic import to_openai_messages


def test_agent_shapes_normalised() -> None:
    out = normalize_messages([
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "assistant", "content": None, "reasoning_content": "hmm",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": "ok", "name": "bob", "unknown": True},
    ], "m")
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1]["content"] == "" and out[1]["reasoning_content"] == "hmm"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"x": 1}  # templates want objects
    assert out[2] == {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}  # name filled in
    assert out[3] == {"role": "user", "content": "ok", "name": "bob"}


@pytest.mark.parametrize("bad, where", [
    ([], "messages"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "messages[0].tool_calls[0]"),
])
def test_bad_messages_name_the_field(bad: list, where: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        normalize_messages(bad, "m")
    assert e.value.details["param"] == where


def test_merge_consecutive_user_turns() -> None:
    merged = merge_consecutive([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}])
    assert merged == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


def test_tools_validated() -> None:
    assert normalize_tools([{"type": "function", "function": {"name": "f"}}]) == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(InvalidRequestError, match=r"tools\[0\]"):
        normalize_tools([{"type": "function"}])


def test_anthropic_messages_to_chat() -> None:
    out = normalize_messages(to_openai_messages([{"type": "text", "text": "sys"}], [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "a"},
                                          {"type": "tool_use", "id": "u1", "name": "f", "input": {"k": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "u1", "content": "r"},
                                     {"type": "text", "text": "next"}]},
    ]), "m")
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "user"]
    assert out[2]["reasoning_content"] == "t" and out[2]["tool_calls"][0]["function"]["arguments"] == {"k": 1}
    assert out[3]["name"] == "f" and out[3]["content"] == "r"
