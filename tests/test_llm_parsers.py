"""Tool-call and reasoning parsers, fed the way an engine streams: whole, and a character at a time."""

from __future__ import annotations

import json

import pytest

from inhouse.errors import ModelSpecError
from inhouse.llm.decoder import ChoiceDecoder
from inhouse.llm.events import ChoiceEnd, ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart, aggregate
from inhouse.llm.reasoning import ThinkTagsParser
from inhouse.llm.tool_parsers import detect_tool_parser, get_tool_parser


def run(parser: str | None, text: str, step: int, reasoning: ThinkTagsParser | None = None,
        tools: list[dict] | None = None):
    dec = ChoiceDecoder(0, mode="parse" if parser else "text",
                        tool_parser=get_tool_parser(parser).create(tools) if parser else None, reasoning=reasoning)
    events = []
    for i in range(0, len(text), step):
        events.extend(dec.feed(text[i:i + step]))
    events.extend(dec.finish("stop"))
    return events, aggregate(events, 1).choices[0]


STEPS = [1, 3, 1000]


@pytest.mark.parametrize("step", STEPS)
def test_hermes_content_then_two_calls(step: int) -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "units": null}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}\n</tool_call>')
    events, c = run("hermes", text, step)
    assert c.text == "Let me check.\n"
    assert [t.name for t in c.tool_calls] == ["get_weather", "add"]
    assert json.loads(c.tool_calls[0].arguments) == {"city": "Paris", "units": None}
    assert json.loads(c.tool_calls[1].arguments) == {"a": 1, "b": [2, {"c": "}"}]}
    assert c.finish_reason == "tool_calls"
    assert "<tool_call>" not in c.text and "</tool_call>" not in "".join(
        e.text for e in events if isinstance(e, TextDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.call for s in starts] == [0, 1] and all(s.id.startswith("call_") for s in starts)
    # the name comes before any argument fragment of its call
    first_args = next(i for i, e in enumerate(events) if isinstance(e, ToolCallArgs))
    assert events.index(starts[0]) < first_args
    if step == 1:
        assert sum(isinstance(e, ToolCallArgs) for e in events) > 5  # streamed, not all at once


@pytest.mark.parametrize("step", STEPS)
def test_hermes_without_closing_tag_and_arguments_first(step: int) -> None:
    text = '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}'
    _, c = run("hermes", text, step)
    assert c.text == ""
    assert c.tool_calls[0].name == "search" and json.loads(c.tool_calls[0].arguments) == {"q": "x"}


@pytest.mark.parametrize("step", STEPS)
def test_hermes_malformed_block_passes_through(step: int) -> None:
    text = "a <tool_call>not json</tool_call> b"
    _, c = run("hermes", text, step)
    assert c.text == text and not c.tool_calls and c.finish_reason == "stop"


@pytest.mark.parametrize("step", STEPS)
def test_hermes_plain_text_with_angle_brackets(step: int) -> None:
    text = "x < y and <tool is not a tag <tool_cal"
    _, c = run("hermes", text, step)
    assert c.text == text


@pytest.mark.parametrize("step", STEPS)
def test_llama3_json(step: int) -> None:
    text = '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}'
    _, c = run("llama3_json", text, step)
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [("f", {"x": 1}), ("g", {})]
    assert c.text == ""
    _, c = run("llama3_json", "  Just text {not a call}", step)
    assert c.text == "  Just text {not a call}" and not c.tool_calls


@pytest.mark.parametrize("step", STEPS)
def test_mistral(step: int) -> None:
    text = 'Sure.[TOOL_CALLS][{"name": "f", "arguments": {"s": "a\\"b"}}, {"name": "g", "arguments": "{\\"k\\": 2}"}]'
    _, c = run("mistral", text, step)
    assert c.text == "Sure."
    assert json.loads(c.tool_calls[0].arguments) == {"s": 'a"b'}
    assert json.loads(c.tool_calls[1].arguments) == {"k": 2}  # arguments sent as a JSON string
    # the marker is a special token some detokenisers drop: the bare array is still calls
    _, c = run("mistral", '[{"name": "f", "arguments": {}}]', step)
    assert c.tool_calls[0].name == "f" and c.text == ""
    _, c = run("mistral", "[1, 2] is a list", step)
    assert c.text == "[1, 2] is a list" and not c.tool_calls


@pytest.mark.parametrize("step", STEPS)
def test_glm4(step: int) -> None:
    text = 'get_weather\n{"city": "Pa\\"ris", "n": {"a": "}"}}\nadd\n{"a": 1}'
    events, c = run("glm4", text, step)
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [
        ("get_weather", {"city": 'Pa"ris', "n": {"a": "}"}}), ("add", {"a": 1})]
    assert c.text == "" and c.finish_reason == "tool_calls"
    if step == 1:
        assert sum(isinstance(e, ToolCallArgs) for e in events) > 5  # streamed, not all at once
    # a reply that opens with a newline, or whose first line is not a name then JSON, is text
    for plain in ("\nHello there.", "Hello there, friend\n{x}", "get_weather\nnot json", "get_weather"):
        _, c = run("glm4", plain, step)
        assert c.text == plain and not c.tool_calls and c.finish_reason == "stop"


GLM45_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "zip": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_glm45_text_then_calls(step: int) -> None:
    """GLM-4.5's format as its template writes it: text, then calls of key/value pairs; values are
    JSON when they parse, else strings, and strings where the schema says so (zip "75001")."""
    text = ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Pa<ris> & co</arg_value>\n"
            "<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
            "</tool_call>\n<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>{\"x\": [1, null]}</arg_value>\n"
            "<arg_key>b</arg_key>\n<arg_value>true</arg_value>\n<arg_key>c</arg_key>\n<arg_value>not json</arg_value>\n"
            "</tool_call>")
    events, c = run("glm45", text, step, tools=GLM45_TOOLS)
    assert c.text == "Let me check.\n" and c.finish_reason == "tool_calls"
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [
        ("get_weather", {"city": "Pa<ris> & co", "zip": "75001", "days": 3}),
        ("add", {"a": {"x": [1, None]}, "b": True, "c": "not json"})]
    assert "<tool_call>" not in "".join(e.text for e in events if isinstance(e, TextDelta))
    # without the tools' schemas a number-like value is a number
    _, c = run("glm45", text, step)
    assert json.loads(c.tool_calls[0].arguments)["zip"] == 75001


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_glm45_compact_form_and_call_without_arguments(step: int) -> None:
    """GLM-4.7 writes the same calls without newlines; a call may have no arguments."""
    text = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
            "<tool_call>now</tool_call>")
    _, c = run("glm45", text, step, tools=GLM45_TOOLS)
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [("get_weather", {"city": "Paris"}),
                                                                         ("now", {})]
    assert c.text == ""


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_glm45_malformed_blocks_are_text(step: int) -> None:
    for plain in ("a <tool_call>not a call at all</tool_call> b",  # a name with spaces
                  "<tool_call>f\n<arg_key>k</arg_key> stray <arg_value>v</arg_value></tool_call>",
                  "<tool_call>f\n<arg_value>v</arg_value></tool_call>",  # a value without its key
                  "x <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",  # cut off
                  "1 < 2 and <tool_ca", "plain text"):
        _, c = run("glm45", plain, step)
        assert c.text == plain and not c.tool_calls and c.finish_reason == "stop"
    # a good call after a malformed block still counts
    _, c = run("glm45", "<tool_call>bad name</tool_call><tool_call>f\n<arg_key>k</arg_key>\n<arg_value>1</arg_value>"
               "\n</tool_call>", step)
    assert c.text == "<tool_call>bad name</tool_call>" and json.loads(c.tool_calls[0].arguments) == {"k": 1}


@pytest.mark.parametrize("step", STEPS)
def test_think_tags(step: int) -> None:
    _, c = run(None, "<think>\nplan it</think>\n\nThe answer.", step, ThinkTagsParser())
    assert c.reasoning == "\nplan it" and c.text == "The answer."
    # template opened the block: only the closing tag appears in the output
    _, c = run(None, "plan</think>answer", step, ThinkTagsParser(prompt_opens_block=True))
    assert (c.reasoning, c.text) == ("plan", "answer")
    # unfinished thinking stays reasoning
    _, c = run(None, "<think>still going", step, ThinkTagsParser())
    assert (c.reasoning, c.text) == ("still going", "")
    _, c = run(None, "No tags <think> here", step, ThinkTagsParser())
    assert (c.reasoning, c.text) == ("", "No tags <think> here")


@pytest.mark.parametrize("step", STEPS)
def test_reasoning_then_tool_call(step: int) -> None:
    text = '<think>need weather</think><tool_call>{"name": "w", "arguments": {}}</tool_call>'
    events, c = run("hermes", text, step, ThinkTagsParser())
    assert c.reasoning == "need weather" and c.text == "" and c.tool_calls[0].name == "w"
    assert any(isinstance(e, ReasoningDelta) for e in events)
    assert isinstance(events[-1], ChoiceEnd) and events[-1].finish_reason == "tool_calls"
    # GLM-4.5 thinks first, as its template shows (an empty block when thinking is off)
    text = ("\n<think>need weather</think>\nChecking.\n<tool_call>w\n<arg_key>c</arg_key>\n<arg_value>x</arg_value>\n"
            "</tool_call>")
    _, c = run("glm45", text, step, ThinkTagsParser())
    assert c.reasoning == "need weather" and c.text == "Checking.\n"
    assert c.tool_calls[0].name == "w" and json.loads(c.tool_calls[0].arguments) == {"c": "x"}


def test_without_parser_text_is_untouched() -> None:
    text = "<think>x</think>\n<tool_call>{}</tool_call>"
    _, c = run(None, text, 2)
    assert c.text == text


def test_required_mode_streams_array_of_calls() -> None:
    dec = ChoiceDecoder(0, mode="required")
    events = []
    for ch in '[{"name": "a", "arguments": {"x": [1, 2]}}, {"name": "b", "arguments": {}}]':
        events.extend(dec.feed(ch))
    events.extend(dec.finish("stop"))
    c = aggregate(events, 1).choices[0]
    assert [(t.name, json.loads(t.arguments)) for t in c.tool_calls] == [("a", {"x": [1, 2]}), ("b", {})]
    assert c.finish_reason == "tool_calls" and c.text == ""


def test_named_mode() -> None:
    dec = ChoiceDecoder(0, mode="named", function="f")
    events = dec.feed('{"a"') + dec.feed(": 1}") + dec.finish("stop")
    c = aggregate(events, 1).choices[0]
    assert c.tool_calls[0].name == "f" and json.loads(c.tool_calls[0].arguments) == {"a": 1}


def test_parser_names() -> None:
    with pytest.raises(ModelSpecError, match="hermes"):
        get_tool_parser("nope")
    assert detect_tool_parser("{{ '<tool_call>' }}") == "hermes"
    assert detect_tool_parser("<|assistant|>{{ f.name }}\n<|observation|>") == "glm4"
    assert detect_tool_parser("plain") is None
    glm45 = "{{ '\\n<tool_call>' + tc.name }}{% for k, v in _args.items() %}<arg_key>{{ k }}</arg_key>"
    assert detect_tool_parser(glm45) == "glm45" and get_tool_parser("glm47") is get_tool_parser("glm45")
    # the architecture, where the template says nothing; the template wins where it does
    assert detect_tool_parser(None, "glm4_moe") == detect_tool_parser("plain", "glm4_moe") == "glm45"
    assert detect_tool_parser("{{ '<tool_call>' }}", "glm4_moe") == "hermes"
    assert detect_tool_parser(None, "llama") is None
