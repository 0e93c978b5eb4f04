"""Turns one choice's generated text into events: reasoning split off first, then tool calls
(parsed from the model's markup, or read from constrained JSON), the rest as content."""

from __future__ import annotations

from typing import Literal

from inhouse.llm.events import ChoiceEnd, Event, ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart
from inhouse.llm.json_calls import CallArgs, CallEnd, CallName, JsonCallScanner
from inhouse.llm.reasoning import ThinkTagsParser
from inhouse.llm.requests import new_call_id
from inhouse.llm.tool_parsers import Content, ToolParser
from inhouse.llm.types import TokenLogprob

CallMode = Literal["text", "parse", "required", "named"]


class ChoiceDecoder:
    """``mode``: ``text`` (content only), ``parse`` (the model's own tool-call markup, via a
    ToolParser), ``required`` (constrained JSON array of calls), ``named`` (constrained JSON
    arguments of the one named function)."""

    def __init__(self, choice: int, *, mode: CallMode = "text", tool_parser: ToolParser | None = None,
                 reasoning: ThinkTagsParser | None = None, function: str | None = None) -> None:
        self.choice = choice
        self._mode = mode
        self._tools = tool_parser
        self._reasoning = reasoning
        self._function = function
        self._scanner = JsonCallScanner() if mode == "required" else None
        self._calls = 0  # completed or started calls
        self._open_call: int | None = None
        self._pending_logprobs: list[TokenLogprob] = []  # of tokens whose text is still held back

    @property
    def made_calls(self) -> bool:
        return self._calls > 0

    def feed(self, text: str, logprobs: list[TokenLogprob] | None = None) -> list[Event]:
        if logprobs:
            self._pending_logprobs.extend(logprobs)
        if not text:
            return []
        logprobs, self._pending_logprobs = (self._pending_logprobs or None), []
        if self._reasoning is not None:
            thought, text = self._reasoning.feed(text)
            out: list[Event] = [ReasoningDelta(self.choice, thought)] if thought else []
        else:
            out = []
        out.extend(self._content(text, logprobs))
        return out

    def finish(self, finish_reason: str, stop_string: str | None = None) -> list[Event]:
        out: list[Event] = []
        if self._reasoning is not None:
            thought, text = self._reasoning.finish()
            if thought:
                out.append(ReasoningDelta(self.choice, thought))
            out.extend(self._content(text, None))
        if self._tools is not None:
            out.extend(self._from_parser(self._tools.finish(), None))
        if self._mode == "named" and self._calls == 0:
            out.extend(self._start(self._function or ""))
            out.append(ToolCallArgs(self.choice, 0, "{}"))
        if self._pending_logprobs and self._mode == "text":
            out.append(TextDelta(self.choice, "", self._pending_logprobs))
            self._pending_logprobs = []
        if self.made_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        out.append(ChoiceEnd(self.choice, finish_reason, stop_string))
        return out

    def _content(self, text: str, logprobs: list[TokenLogprob] | None) -> list[Event]:
        if not text:
            return []
        if self._mode == "text" or (self._mode == "parse" and self._tools is None):
            return [TextDelta(self.choice, text, logprobs)]
        if self._mode == "parse":
            assert self._tools is not None
            return self._from_parser(self._tools.feed(text), logprobs)
        if self._mode == "named":
            out: list[Event] = []
            if self._calls == 0:
                out.extend(self._start(self._function or ""))
            out.append(ToolCallArgs(self.choice, 0, text))
            return out
        assert self._scanner is not None
        evs = self._scanner.feed(text)
        self._scanner.stray()  # nothing but calls can be generated under the constraint
        return self._from_parser(list(evs), None)

    def _start(self, name: str) -> list[Event]:
        self._open_call = self._calls
        self._calls += 1
        return [ToolCallStart(self.choice, self._open_call, new_call_id(), name)]

    def _from_parser(self, evs: list[Content | CallName | CallArgs | CallEnd],
                     logprobs: list[TokenLogprob] | None) -> list[Event]:
        out: list[Event] = []
        for ev in evs:
            if isinstance(ev, Content):
                if ev.text:
                    out.append(TextDelta(self.choice, ev.text, logprobs))
                    logprobs = None
            elif isinstance(ev, CallName):
                out.extend(self._start(ev.name))
            elif isinstance(ev, CallArgs):
                if self._open_call is not None:
                    out.append(ToolCallArgs(self.choice, self._open_call, ev.fragment))
            elif isinstance(ev, CallEnd):
                self._open_call = None
        return out
