"""A GGUF's chat template rendered in process with Jinja2, for the plain conversations (system,
user and assistant turns of text) on which it was checked to give llama-server's own text.

llama-server renders a chat (``/apply-template``) with its own Jinja engine, 2.6–4.6 ms for a
short chat on a 2-core machine: a request's time to first token pays it, and in a burst it is
taken from the decoding threads. Jinja2, the engine the templates are written for, takes
~0.1 ms. At load, :func:`verified` renders a set of probe conversations both ways; any
difference (a polyfill llama-server applies, a format of its own, an error) keeps every chat on
llama-server. Conversations of another shape (tools, tool calls and results, images, names,
reasoning, template arguments, a last turn of the assistant's to continue) always go to
llama-server, which handles them its own way."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_ROLES = frozenset(("system", "user", "assistant"))
_PLAIN_KEYS = frozenset(("role", "content"))

# The shapes rendered in process, with text that trips naive whitespace, escaping and markup handling.
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "hello"},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi  there\n\nnew line"}),
    ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}),
    ({"role": "system", "content": " padded \n"}, {"role": "user", "content": "<b>&amp; {{ x }} {% y %}</b>"},
     {"role": "assistant", "content": "ü 日本 🙂 \"quoted\" 'single'"}, {"role": "user", "content": "\tlast\n"}),
    ({"role": "user", "content": ""},),
)


def plain(messages: Sequence[dict[str, Any]]) -> bool:
    """Text turns only, of the roles the probes cover, the last not the assistant's (llama-server
    continues such a turn as a prefill, its own way)."""
    return bool(messages) and messages[-1].get("role") != "assistant" and all(
        m.get("role") in _ROLES and isinstance(m.get("content"), str) and m.keys() <= _PLAIN_KEYS for m in messages)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # Jinja2's own escapes <, > and & for HTML; chat templates want plain JSON
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


class LocalTemplate:
    """One chat template compiled for Jinja2's sandbox, as Hugging Face templates expect it
    (trimmed blocks, ``raise_exception``, ``strftime_now``, a plain ``tojson``)."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text for a plain conversation, the generation prompt added. Raises
        ``jinja2.TemplateError`` (the template's own ``raise_exception`` included)."""
        return self._template.render(messages=list(messages), add_generation_prompt=True, **self._tokens)


def verified(source: str | None, bos_token: str, eos_token: str,
             server_render: Callable[[list[dict[str, Any]]], str]) -> tuple[LocalTemplate | None, str]:
    """The template compiled, when it renders every probe as ``server_render`` (llama-server)
    does; else None. The second item says which, for the log."""
    if not source:
        return None, "the file has no chat template"
    try:
        local = LocalTemplate(source, bos_token, eos_token)
    except jinja2.TemplateError as err:
        return None, f"Jinja2 cannot compile it ({err})"
    for i, probe in enumerate(PROBES):
        messages = [dict(m) for m in probe]
        try:
            mine = local.render(messages)
        except Exception as err:  # the template's raise_exception, a filter it lacks here, ...
            return None, f"Jinja2 fails on probe {i} ({type(err).__name__}: {err})"
        try:
            theirs = server_render(messages)
        except Exception as err:  # llama-server refuses the shape: then it renders every chat
            return None, f"llama-server does not render probe {i} ({err})"
        if mine != theirs:
            return None, f"probe {i} renders differently ({mine[:80]!r} here, {theirs[:80]!r} in llama-server)"
    return local, f"matches llama-server on {len(PROBES)} probe conversations"
