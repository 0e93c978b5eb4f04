"""The per-request context: request id and W3C trace context (``traceparent``), carried in a
contextvar so logs, metrics and spans of one request agree without being passed around.

https://www.w3.org/TR/trace-context/#traceparent-header"""

from __future__ import annotations

import random
import re
from contextvars import ContextVar, Token
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


@dataclass(slots=True)
class RequestContext:
    request_id: str
    trace_id: str
    span_id: str  # this server's span for the request
    parent_span_id: str | None = None  # the caller's span, from its traceparent
    sampled: bool = True
    model: str | None = None
    version: int | None = None
    code: int | None = None
    start_ns: int = 0  # wall clock, for spans
    queue_s: float | None = None
    compute_s: float | None = None
    compute_end_ns: int = 0
    batch_size: int = 0
    route: str | None = None  # the matched route template, as the HTTP security middleware found it

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | bytes | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) from a ``traceparent`` header, or None if it is
    absent or invalid (the spec says: then start a new trace)."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    m = _TRACEPARENT.match(text.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def new_context(traceparent: str | bytes | None = None, request_id: str | bytes | None = None,
                start_ns: int = 0) -> RequestContext:
    ids = f"{random.getrandbits(192):048x}"  # one draw: trace id, span id, request id suffix
    span_id = ids[32:] if ids[32:] != _ZERO_SPAN else "1".zfill(16)
    parsed = parse_traceparent(traceparent) if traceparent else None
    if parsed is None:
        trace_id, parent, sampled = ids[:32] if ids[:32] != _ZERO_TRACE else "1".zfill(32), None, True
    else:
        trace_id, parent, sampled = parsed
    rid = request_id.decode("latin-1") if isinstance(request_id, bytes) else request_id
    if not rid or not _REQUEST_ID.match(rid):
        rid = trace_id[:16] + ids[:8] if parsed is not None else ids[:24]
    return RequestContext(request_id=rid, trace_id=trace_id, span_id=span_id, parent_span_id=parent,
                          sampled=sampled, start_ns=start_ns)


_current: ContextVar[RequestContext | None] = ContextVar("inhouse_request", default=None)


def current() -> RequestContext | None:
    return _current.get()


def activate(ctx: RequestContext) -> Token[RequestContext | None]:
    return _current.set(ctx)


def deactivate(token: Token[RequestContext | None]) -> None:
    _current.reset(token)
