"""Logging set-up: JSON lines for machines, a compact format for terminals."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from typing import Any

import orjson

from inhouse.observability.context import current
from inhouse.security.pii import PiiLogFilter

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                doc[k] = v
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items()
                          if k not in _STD_ATTRS and not k.startswith("_"))
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} " \
               f"{record.getMessage()}{' ' + extras if extras else ''}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class RequestContextFilter(logging.Filter):
    """Adds the current request's id and trace id to every record logged while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current()
        if ctx is not None and not hasattr(record, "request_id"):
            record.request_id = ctx.request_id
            record.trace_id = ctx.trace_id
        return True


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record to ``sys.stderr`` as it is when the record is emitted, not as it was when
    logging was set up: a caller that swaps stderr (a test runner, an embedding application) and
    closes the old one must not turn every later log line into 'I/O operation on closed file'."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class JsonLineSink:
    """A fast lane into the JSON handler for lines built elsewhere (the access log builds its
    line with orjson, no ``LogRecord``, no formatter): lines written on an event loop are
    joined and written together ``FLUSH_AFTER_S`` after the first of them (at once when
    ``MAX_PENDING`` wait); from any other thread they are written at once. A short delay rather
    than one write per loop turn: gRPC calls finish one or two per turn. They go where the
    handler's records go (``sys.stderr`` as it is then), under its lock, so lines never
    interleave. ``flush`` (at server stop and exit) writes what is still pending."""

    FLUSH_AFTER_S = 0.002
    MAX_PENDING = 256

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self._pending: list[bytes] = []
        self._scheduled = False
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        with self._lock:
            self._pending.append(line)
            if self._scheduled and len(self._pending) < self.MAX_PENDING:
                return
            arm = not self._scheduled  # else: a full buffer, its flush already armed: written now
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None and arm:
                self._scheduled = True
        if loop is not None and arm:
            loop.call_later(self.FLUSH_AFTER_S, self.flush)
        else:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            self._scheduled = False
            lines, self._pending = self._pending, []
        if not lines:
            return
        text = (b"\n".join(lines) + b"\n").decode()
        with self.handler.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            try:
                stream = sys.stderr
                stream.write(text)
                stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: as logging does, the lines are dropped
                pass


_sink: JsonLineSink | None = None


def json_line_sink(logger: logging.Logger) -> JsonLineSink | None:
    """The fast lane for ``logger``'s records, when their only destination is the JSON handler
    :func:`configure_logging` installed; None when anything else would see them (a handler or
    filter added since, such as a test's log capture): then they must go through logging."""
    sink = _sink
    if sink is None or logger.filters or logger.handlers or not logger.propagate:
        return None
    root = logging.root
    handlers = root.handlers
    if len(handlers) != 1 or handlers[0] is not sink.handler or root.filters:
        return None
    parent = logger.parent
    while parent is not None and parent is not root:
        if parent.handlers or parent.filters or not parent.propagate:
            return None
        parent = parent.parent
    return sink


def flush_json_lines() -> None:
    if _sink is not None:
        _sink.flush()


atexit.register(flush_json_lines)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    global _sink
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    flush_json_lines()
    _sink = JsonLineSink(handler) if use_json else None
    handler.addFilter(RequestContextFilter())
    handler.addFilter(PiiLogFilter())  # PII never reaches the logs
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs each of our own calls to engine children and upstreams at info: a line per token
    # request that the access log already covers
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").handlers[:] = []
    logging.getLogger("uvicorn").handlers[:] = []
