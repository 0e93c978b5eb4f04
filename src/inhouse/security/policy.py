"""Per-model content policies (model.yaml ``policy:``): deny patterns, a maximum input size and
the tools a request may offer. Checked before a request reaches the model; a violation is
error 5001 and is audited."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from inhouse.core.spec import PolicySpec
from inhouse.errors import PolicyBlockedError


@lru_cache(maxsize=512)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


def check_policy(policy: PolicySpec, model: str, *, size: int, texts: Sequence[str] = (),
                 tools: Iterable[str] | None = None) -> None:
    """Raise 5001 when the request breaks the model's policy. The message names the rule, never
    the matched text (it may be sensitive)."""
    if policy.max_input_bytes is not None and size > policy.max_input_bytes:
        raise PolicyBlockedError(
            f"The request ({size} bytes) is larger than model '{model}' allows ({policy.max_input_bytes} bytes "
            "by its content policy); send less input.", details={"rule": "max_input_bytes"})
    if policy.allowed_tools is not None and tools is not None:
        denied = sorted(set(tools) - set(policy.allowed_tools))
        if denied:
            raise PolicyBlockedError(
                f"Model '{model}' may not be offered tool(s) {denied} by its content policy; allowed: "
                f"{policy.allowed_tools or 'none'}.", details={"rule": "allowed_tools"})
    if policy.deny_patterns and texts:
        rxs = _compiled(tuple(policy.deny_patterns))
        for text in texts:
            for i, rx in enumerate(rxs):
                if rx.search(text):
                    raise PolicyBlockedError(
                        f"The request was blocked by model '{model}' content policy (deny pattern #{i + 1}).",
                        details={"rule": f"deny_patterns[{i}]"})


def tool_names(tools: Any) -> list[str] | None:
    """The names of the tools a request offers (OpenAI ``{"type": "function", "function":
    {"name": …}}`` or Anthropic ``{"name": …}`` form), for ``allowed_tools``; None when it
    offers none. An entry without a name counts as a tool named 'None', which no policy allows."""
    if not isinstance(tools, list):
        return None
    names = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else t.get("name") if isinstance(t, dict) else None
        names.append(str(name))
    return names
