"""Protocol-neutral LLM requests: what the OpenAI and Anthropic adapters translate into."""

from __future__ import annotations

import dataclasses
import json
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
    # the response cache's tenant (protocols/cache_scope.py); None: not cached
    cache_tenant: str | None = None


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
    # the response cache's tenant (protocols/cache_scope.py); None: not cached
    cache_tenant: str | None = None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# what does not change an answer: who asked, when to give up, and in which order to run it
_NOT_IN_KEY = frozenset({"request_id", "timeout_s", "priority", "cache_tenant"})


def request_canonical(req: ChatRequest | CompletionRequest) -> bytes:
    """The request as the response cache keys it: every field that decides the answer, as JSON
    with sorted keys (the request's kind included, so a chat never meets a completion)."""
    fields = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name not in _NOT_IN_KEY}
    doc = {"kind": type(req).__name__, **{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v)
                                          and not isinstance(v, type) else v for k, v in fields.items()}}
    return json.dumps(doc, sort_keys=True, default=repr, separators=(",", ":")).encode()
