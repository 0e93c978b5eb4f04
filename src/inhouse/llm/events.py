"""What the LLM service streams to the protocol adapters: protocol-neutral deltas of one or
more choices. OpenAI and Anthropic render the same events in their own wire formats."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from inhouse.llm.types import TokenLogprob


@dataclass(slots=True)
class Prompt:
    """First event of every request: the prompt is built and accepted, generation starts."""

    prompt_tokens: int
    n: int


@dataclass(slots=True)
class TextDelta:
    choice: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class ReasoningDelta:
    choice: int
    text: str


@dataclass(slots=True)
class ToolCallStart:
    choice: int
    call: int  # index of the call within the choice
    id: str
    name: str


@dataclass(slots=True)
class ToolCallArgs:
    choice: int
    call: int
    fragment: str  # fragments of one call concatenate to its JSON arguments


@dataclass(slots=True)
class ChoiceEnd:
    choice: int
    finish_reason: str  # stop | length | tool_calls | content_filter
    stop_string: str | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = Prompt | TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgs | ChoiceEnd | Usage


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(slots=True)
class Choice:
    """One choice, aggregated from its events (for non-streaming responses)."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_string: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Completion:
    choices: list[Choice]
    usage: Usage


def aggregate(events: list[Event], n: int) -> Completion:
    choices = [Choice(index=i) for i in range(n)]
    usage = Usage(0, 0)
    for ev in events:
        if isinstance(ev, Usage):
            usage = ev
            continue
        if isinstance(ev, Prompt):
            continue
        c = choices[ev.choice]
        if isinstance(ev, TextDelta):
            c.text += ev.text
            if ev.logprobs is not None:
                c.logprobs = (c.logprobs or []) + ev.logprobs
        elif isinstance(ev, ReasoningDelta):
            c.reasoning += ev.text
        elif isinstance(ev, ToolCallStart):
            c.tool_calls.append(ToolCall(ev.id, ev.name, ""))
        elif isinstance(ev, ToolCallArgs):
            c.tool_calls[ev.call].arguments += ev.fragment
        elif isinstance(ev, ChoiceEnd):
            c.finish_reason, c.stop_string = ev.finish_reason, ev.stop_string
    return Completion(choices, usage)


_EVENT_TYPES: dict[str, type[Event]] = {cls.__name__: cls for cls in
                                        (Prompt, TextDelta, ReasoningDelta, ToolCallStart, ToolCallArgs, ChoiceEnd,
                                         Usage)}


def encode_events(events: list[Event]) -> bytes:
    """One answer's events for the response cache (JSON: never pickle from a shared store).
    Text deltas with logprobs are not cached, so every field is a plain value."""
    return json.dumps([[type(ev).__name__, dataclasses.asdict(ev)] for ev in events],
                      separators=(",", ":")).encode()


def decode_events(value: bytes) -> list[Event]:
    return [_EVENT_TYPES[name](**fields) for name, fields in json.loads(value)]
