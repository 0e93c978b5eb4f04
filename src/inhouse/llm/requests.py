"""Protocol-neutral LLM requests: what the OpenAI and Anthropic adapters translate into."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from inhouse.llm.types import SamplingParams

ToolChoice = Literal["auto", "none", "required"] | str  # any other string: the name of a function


@dataclass(slots=True)
class JsonFormat:
    """Constrained JSON output: any JSON object (``schema`` None) or one matching ``schema``."""

    schema: dict[str, Any] | None = None


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # normalised (see llm/chat.py)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: list[dict[str, Any]] | None = None  # OpenAI form: {"type": "function", "function": {...}}
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    response_format: JsonFormat | None = None
    n: int = 1
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timeout_s: float | None = None
    priority: int = 0


@dataclass(slots=True)
class CompletionRequest:
    model: str
    prompts: list[str | list[int]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    echo: bool = False
    response_format: JsonFormat | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timeout_s: float | None = None
    priority: int = 0


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
