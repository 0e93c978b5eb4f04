"""Parsers that turn a model's native tool-call markup into tool calls, incrementally.

- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
- ``llama3_json`` (Llama 3.1+): the whole reply is ``{"name": ..., "parameters": {...}}``
  (optionally after ``<|python_tag|>``, several separated by ``;``)
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``
- ``glm4`` (GLM-4, GLM-4-0414): the reply is the function's name on a line, then its arguments
  as a JSON object (``get_weather\n{"city": "Paris"}``); the template ends the turn with
  ``<|observation|>``, and a reply opening with a newline is text
- ``glm45`` (GLM-4.5, 4.6, 4.7): ``<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>
  ...</tool_call>`` (4.7 without the newlines); a value is JSON when it parses, else a string —
  always a string for an argument the tool's schema types as one

Each parser is fed the model's text as it streams and returns ``Content`` (ordinary text) and
the scanner's ``CallName`` / ``CallArgs`` / ``CallEnd`` events; markup never reaches content
unless it was not a well-formed call, in which case the text is passed through unchanged."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from inhouse.errors import ModelSpecError
from inhouse.llm.json_calls import CallArgs, CallEnd, CallName, JsonCallScanner, ScanEvent


@dataclass(slots=True)
class Content:
    text: str


ParseEvent = Content | ScanEvent


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    name = "base"

    @classmethod
    def create(cls, tools: Sequence[dict[str, Any]] | None = None) -> ToolParser:
        """A parser for one reply; ``tools`` are the request's (OpenAI form), for parsers that need them."""
        return cls()

    def feed(self, text: str) -> list[ParseEvent]:
        raise NotImplementedError

    def finish(self) -> list[ParseEvent]:
        raise NotImplementedError


class _Block:
    """One tool-call block being scanned; remembers its raw text so a malformed block can be
    passed through as content."""

    def __init__(self, opener: str) -> None:
        self.scanner = JsonCallScanner()
        self.raw = [opener]
        self.named = False

    def feed(self, text: str) -> list[ParseEvent]:
        self.raw.append(text)
        out: list[ParseEvent] = []
        for ev in self.scanner.feed(text):
            if isinstance(ev, CallName):
                self.named = True
            out.append(ev)
        return out


class HermesParser(ToolParser):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buf = ""
        self._block: _Block | None = None
        self._calls = 0

    def feed(self, text: str) -> list[ParseEvent]:
        self._buf += text
        out: list[ParseEvent] = []
        while self._buf:
            if self._block is None:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    keep = partial_suffix(self._buf, self.OPEN)
                    emit, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    self._content(emit, out)
                    break
                self._content(self._buf[:i], out)
                self._buf = self._buf[i + len(self.OPEN):]
                self._block = _Block(self.OPEN)
                continue
            j = self._buf.find(self.CLOSE)
            if j < 0:
                keep = partial_suffix(self._buf, self.CLOSE)
                part, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                out.extend(self._scan(part))
                break
            out.extend(self._scan(self._buf[:j]))
            self._buf = self._buf[j + len(self.CLOSE):]
            out.extend(self._close_block(self.CLOSE))
        return out

    def _content(self, text: str, out: list[ParseEvent]) -> None:
        if not text:
            return
        if self._calls and not text.strip():
            return  # whitespace between and after calls
        out.append(Content(text))

    def _scan(self, text: str) -> list[ParseEvent]:
        assert self._block is not None
        evs = self._block.feed(text)
        self._calls += sum(isinstance(e, CallEnd) and e.ok for e in evs)
        return [e for e in evs if not isinstance(e, CallEnd) or e.ok]

    def _close_block(self, closer: str) -> list[ParseEvent]:
        block, self._block = self._block, None
        assert block is not None
        if block.named:
            return []
        return [Content("".join(block.raw) + closer)]

    def finish(self) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        if self._block is None:
            self._content(self._buf, out)
        else:
            out.extend(self._scan(self._buf))
            out.extend(self._close_block(""))
        self._buf = ""
        return out


class _JsonTailParser(ToolParser):
    """Content until a marker (or, for llama3_json, a reply that opens with ``{``), then a
    sequence of JSON call objects to the end."""

    markers: tuple[str, ...] = ()
    json_start = False  # a reply that opens with JSON (after optional markers) is calls
    json_opener = "{"

    def __init__(self) -> None:
        self._buf = ""
        self._block: _Block | None = None
        self._started = False

    def feed(self, text: str) -> list[ParseEvent]:
        if self._block is not None:
            return self._block.feed(text)
        self._buf += text
        out: list[ParseEvent] = []
        if self.json_start and not self._started:
            stripped = self._buf.lstrip()
            for m in self.markers:
                if stripped.startswith(m):
                    stripped = stripped[len(m):].lstrip()
            compact = "".join(stripped.split())
            if (not stripped or any(m.startswith(self._buf.lstrip()) for m in self.markers)
                    or (len(compact) < len(self.json_opener) and self.json_opener.startswith(compact))):
                return out  # undecided
            self._started = True
            if compact.startswith(self.json_opener):
                self._block = _Block(self._buf[: len(self._buf) - len(stripped)])
                self._buf = ""
                return self._block.feed(stripped)
        for m in self.markers:
            i = self._buf.find(m)
            if i >= 0:
                if self._buf[:i]:
                    out.append(Content(self._buf[:i]))
                rest = self._buf[i + len(m):]
                self._buf = ""
                self._block = _Block(m)
                out.extend(self._block.feed(rest))
                return out
        keep = max((partial_suffix(self._buf, m) for m in self.markers), default=0)
        emit, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        if emit:
            out.append(Content(emit))
        return out

    def finish(self) -> list[ParseEvent]:
        if self._block is None:
            buf, self._buf = self._buf, ""
            return [Content(buf)] if buf else []
        block, self._block = self._block, None
        if block.named:
            return []
        return [Content("".join(block.raw))]


class Llama3JsonParser(_JsonTailParser):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    json_start = True


class MistralParser(_JsonTailParser):
    """``[TOOL_CALLS]`` is a special token: engines that skip special tokens when detokenising
    leave only the JSON array, so a reply that opens with ``[{`` is read as calls too."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    json_start = True
    json_opener = "[{"


_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")


class Glm4Parser(ToolParser):
    """``NAME\n{arguments}``, possibly several one after another. Until the first line is
    complete the reply is undecided (held back); a first line that cannot be a function name,
    or one not followed by ``{``, makes the whole reply text."""

    name = "glm4"

    def __init__(self) -> None:
        self._buf = ""
        self._mode = "start"  # start | text | args | after
        self._raw: list[str] = []  # the current call's text, in case it never closes
        self._depth = 0
        self._in_str = self._esc = False
        self._calls = 0

    def feed(self, text: str) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        self._buf += text
        while self._buf:
            if self._mode == "text":
                out.append(Content(self._buf))
                self._buf = ""
            elif self._mode == "args":
                self._args(out)
            elif not self._head(out):
                break  # undecided: wait for more text
        return out

    def _head(self, out: list[ParseEvent]) -> bool:
        """Decide, at the start of the reply or after a call, whether a call follows."""
        buf = self._buf.lstrip() if self._mode == "after" else self._buf
        if not buf:
            return False
        line, nl, rest = buf.partition("\n")
        plausible = _FUNCTION_NAME.fullmatch(line.strip()) is not None
        if not nl:
            if plausible or (not line.strip() and self._mode == "after"):
                return False
            return self._to_text(out)
        rest = rest.lstrip()
        if plausible and not rest:
            return False
        if not plausible or not rest.startswith("{"):
            return self._to_text(out)
        out.append(CallName(line.strip()))
        self._raw = [buf[: len(buf) - len(rest)]]
        self._buf, self._mode, self._depth = rest, "args", 0
        return True

    def _to_text(self, out: list[ParseEvent]) -> bool:
        if self._mode == "after":
            self._buf = self._buf.lstrip()
        self._mode = "text"
        return True

    def _args(self, out: list[ParseEvent]) -> None:
        """Pass the argument object through as it streams, up to its closing brace."""
        for i, ch in enumerate(self._buf):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
                continue
            if ch == '"':
                self._in_str, self._esc = True, False
            elif ch == "{":
                self._depth += 1
            elif ch == "}":
                self._depth -= 1
                if self._depth == 0:
                    part, self._buf = self._buf[: i + 1], self._buf[i + 1:]
                    self._raw.append(part)
                    out.extend([CallArgs(part), CallEnd("".join(self._raw), True)])
                    self._calls += 1
                    self._mode = "after"
                    return
        self._raw.append(self._buf)
        out.append(CallArgs(self._buf))
        self._buf = ""

    def finish(self) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        if self._mode in ("start", "text") and self._buf:
            out.append(Content(self._buf))
        elif self._mode == "after" and self._buf.strip():
            out.append(Content(self._buf.strip()))
        elif self._mode == "args":
            out.append(CallEnd("".join(self._raw), True))  # cut short (length): the call stays, as for hermes
        self._buf = ""
        return out


_ARG_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class Glm45Parser(ToolParser):
    """GLM-4.5's XML-ish calls. Text outside ``<tool_call>`` blocks streams as content; a call
    comes out whole once its ``</tool_call>`` arrives (its arguments are only JSON once every
    pair is read). A block that is not a name and key/value pairs, or one the reply never
    closes, is passed through as text."""

    name = "glm45"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, string_args: dict[str, set[str]] | None = None) -> None:
        self._buf = ""
        self._in_call = False
        self._calls = 0
        self._string_args = string_args or {}  # tool name -> the arguments its schema types as strings

    @classmethod
    def create(cls, tools: Sequence[dict[str, Any]] | None = None) -> ToolParser:
        strings: dict[str, set[str]] = {}
        for t in tools or ():
            fn = t.get("function", t)
            props = (fn.get("parameters") or {}).get("properties") or {}
            if isinstance(props, dict):
                strings[str(fn.get("name"))] = {k for k, v in props.items()
                                                 if isinstance(v, dict) and v.get("type") == "string"}
        return cls(strings)

    def feed(self, text: str) -> list[ParseEvent]:
        self._buf += text
        out: list[ParseEvent] = []
        while self._buf:
            if not self._in_call:
                i = self._buf.find(self.OPEN)
                if i < 0:
                    keep = partial_suffix(self._buf, self.OPEN)
                    self._content(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                self._content(self._buf[:i], out)
                self._buf, self._in_call = self._buf[i + len(self.OPEN):], True
                continue
            j = self._buf.find(self.CLOSE)
            if j < 0:
                break
            block, self._buf = self._buf[:j], self._buf[j + len(self.CLOSE):]
            self._in_call = False
            out.extend(self._call(block))
        return out

    def _content(self, text: str, out: list[ParseEvent]) -> None:
        if text and not (self._calls and not text.strip()):  # whitespace between and after calls is dropped
            out.append(Content(text))

    def _call(self, block: str) -> list[ParseEvent]:
        raw = self.OPEN + block + self.CLOSE
        ends = [i for i in (block.find("\n"), block.find("<arg_key>")) if i >= 0]
        cut = min(ends) if ends else len(block)
        name, rest = block[:cut].strip(), block[cut:]
        if _FUNCTION_NAME.fullmatch(name) is None:
            return [Content(raw)]
        args: dict[str, Any] = {}
        pos = 0
        while (m := _ARG_PAIR.match(rest, pos)) is not None:
            key = m.group(1).strip()
            args[key] = self._value(name, key, m.group(2))
            pos = m.end()
        if rest[pos:].strip():
            return [Content(raw)]
        self._calls += 1
        return [CallName(name), CallArgs(json.dumps(args, ensure_ascii=False)), CallEnd(raw, True)]

    def _value(self, tool: str, key: str, value: str) -> Any:
        if key in self._string_args.get(tool, ()):
            return value
        try:
            return json.loads(value)
        except ValueError:
            return value

    def finish(self) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        if self._in_call:
            out.append(Content(self.OPEN + self._buf))  # cut off before </tool_call>: text, as it came
        else:
            self._content(self._buf, out)
        self._buf, self._in_call = "", False
        return out


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "glm4": Glm4Parser,
    "glm45": Glm45Parser,
    "glm47": Glm45Parser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    cls = PARSERS.get(name)
    if cls is None:
        raise ModelSpecError(
            f"tool_call_parser '{name}' is not known; use one of {', '.join(sorted(PARSERS))}."
        )
    return cls


# architectures whose format a template might not show (a GGUF or folder without its template)
_BY_MODEL_TYPE = {"glm4_moe": "glm45", "glm4v_moe": "glm45"}


def detect_tool_parser(chat_template: str | None, model_type: str | None = None) -> str | None:
    """A parser that fits a chat template's own tool-call format, else the architecture's, when
    the spec names none."""
    if not chat_template:
        return _BY_MODEL_TYPE.get(model_type or "")
    if "<arg_key>" in chat_template:  # before hermes: GLM-4.5 wraps its calls in <tool_call> too
        return "glm45"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|observation|>" in chat_template:
        return "glm4"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return "llama3_json"
    return _BY_MODEL_TYPE.get(model_type or "")
