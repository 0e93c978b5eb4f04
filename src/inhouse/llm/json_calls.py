"""A streaming scanner for tool calls written as JSON objects, ``{"name": ..., "arguments":
{...}}`` (or ``"parameters"``), one after another or inside an array. It reports each call's
name as soon as it is complete and then its arguments as raw JSON fragments, so clients see
a call forming token by token instead of all at once at the end."""

from __future__ import annotations

import json
from dataclasses import dataclass

ARG_KEYS = ("arguments", "parameters", "input")


@dataclass(slots=True)
class CallName:
    name: str


@dataclass(slots=True)
class CallArgs:
    fragment: str


@dataclass(slots=True)
class CallEnd:
    raw: str  # the whole object text, for diagnostics
    ok: bool  # False: the object had no usable "name"


ScanEvent = CallName | CallArgs | CallEnd


class JsonCallScanner:
    """Feed text; get ``CallName`` / ``CallArgs`` / ``CallEnd`` events. Text between objects
    (whitespace, ``[``, ``]``, ``,``, ``;``) is skipped; anything else there is returned by
    :meth:`stray` so a parser can treat it as ordinary content."""

    def __init__(self) -> None:
        self._depth = 0  # 0: between objects
        self._in_str = False
        self._esc = False
        self._raw: list[str] = []
        self._phase = "key"  # key | in_key | colon | value | name_str | args | skip | after
        self._key: list[str] = []
        self._name_buf: list[str] = []
        self._name: str | None = None
        self._pending: list[str] = []  # argument fragments seen before the name
        self._args_seen = False
        self._args_depth = 0
        self._args_is_str = False
        self._args_str: list[str] = []
        self._skip_depth = 0
        self._stray: list[str] = []

    @property
    def in_object(self) -> bool:
        return self._depth > 0

    def stray(self) -> str:
        out = "".join(self._stray)
        self._stray.clear()
        return out

    def feed(self, text: str) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        args: list[str] = []

        def flush_args() -> None:
            if args:
                frag = "".join(args)
                args.clear()
                if self._name is None:
                    self._pending.append(frag)
                else:
                    events.append(CallArgs(frag))

        for ch in text:
            if self._depth == 0:
                if ch == "{":
                    self._start_object()
                    self._raw.append(ch)
                elif not (ch.isspace() or ch in "[],;"):
                    self._stray.append(ch)
                continue
            self._raw.append(ch)
            phase = self._phase
            if phase == "args":
                if self._args_is_str:
                    self._args_str.append(ch)
                    if self._esc:
                        self._esc = False
                    elif ch == "\\":
                        self._esc = True
                    elif ch == '"':
                        decoded = _loads_str('"' + "".join(self._args_str))
                        args.append(decoded if decoded is not None else '"' + "".join(self._args_str))
                        self._phase = "after"
                    continue
                if self._in_str:
                    args.append(ch)
                    if self._esc:
                        self._esc = False
                    elif ch == "\\":
                        self._esc = True
                    elif ch == '"':
                        self._in_str = False
                    continue
                if ch == '"':
                    self._in_str = True
                    args.append(ch)
                elif ch in "{[":
                    self._args_depth += 1
                    args.append(ch)
                elif ch in "}]":
                    if self._args_depth == 0:  # a primitive value ended by the object's close
                        self._phase = "after"
                        flush_args()
                        self._close_char(ch, events)
                        continue
                    self._args_depth -= 1
                    args.append(ch)
                    if self._args_depth == 0:
                        self._phase = "after"
                elif ch == "," and self._args_depth == 0:
                    self._phase = "key"
                else:
                    args.append(ch)
                continue
            if phase == "skip":
                if self._in_str:
                    if self._esc:
                        self._esc = False
                    elif ch == "\\":
                        self._esc = True
                    elif ch == '"':
                        self._in_str = False
                    continue
                if ch == '"':
                    self._in_str = True
                elif ch in "{[":
                    self._skip_depth += 1
                elif ch in "}]":
                    if self._skip_depth == 0:
                        flush_args()
                        self._close_char(ch, events)
                        continue
                    self._skip_depth -= 1
                elif ch == "," and self._skip_depth == 0:
                    self._phase = "key"
                continue
            if phase == "in_key":
                if self._esc:
                    self._esc = False
                    self._key.append(ch)
                elif ch == "\\":
                    self._esc = True
                    self._key.append(ch)
                elif ch == '"':
                    self._phase = "colon"
                else:
                    self._key.append(ch)
                continue
            if phase == "name_str":
                self._name_buf.append(ch)
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    name = _loads_str('"' + "".join(self._name_buf))
                    self._phase = "after"
                    if name and self._name is None:
                        self._name = name
                        events.append(CallName(name))
                        flush_args()
                        events.extend(CallArgs(f) for f in self._pending)
                        self._pending.clear()
                continue
            if ch.isspace():
                continue
            if phase == "key":
                if ch == '"':
                    self._key.clear()
                    self._phase = "in_key"
                elif ch == "}":
                    flush_args()
                    self._close_char(ch, events)
                continue
            if phase == "colon":
                if ch == ":":
                    self._phase = "value"
                continue
            if phase == "value":
                key = "".join(self._key)
                if key == "name" and ch == '"' and self._name is None:
                    self._name_buf.clear()
                    self._phase = "name_str"
                elif key in ARG_KEYS and not self._args_seen:
                    self._args_seen = True
                    self._phase = "args"
                    self._in_str = False
                    if ch == '"':
                        self._args_is_str = True
                        self._args_str.clear()
                    elif ch in "{[":
                        self._args_depth = 1
                        args.append(ch)
                    else:
                        self._args_depth = 0
                        args.append(ch)
                else:
                    self._phase = "skip"
                    self._skip_depth = 0
                    if ch == '"':
                        self._in_str = True
                    elif ch in "{[":
                        self._skip_depth = 1
                continue
            if phase == "after":
                if ch == ",":
                    self._phase = "key"
                elif ch == "}":
                    flush_args()
                    self._close_char(ch, events)
                continue
        flush_args()
        return events

    def _start_object(self) -> None:
        self._depth = 1
        self._phase = "key"
        self._in_str = self._esc = False
        self._raw = []
        self._name = None
        self._pending = []
        self._args_seen = False
        self._args_is_str = False
        self._args_depth = 0

    def _close_char(self, ch: str, events: list[ScanEvent]) -> None:
        if ch != "}":
            return
        raw = "".join(self._raw)
        self._depth = 0
        if self._name is None:
            events.append(CallEnd(raw, ok=False))
            return
        if not self._args_seen:
            events.append(CallArgs("{}"))
        events.append(CallEnd(raw, ok=True))


def _loads_str(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
