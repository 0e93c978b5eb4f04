"""Logging set-up: JSON lines for machines, a compact format for terminals."""

from __future__ import annotations

import logging
import sys
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


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(RequestContextFilter())
    handler.addFilter(PiiLogFilter())  # PII never reaches the logs
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").handlers[:] = []
    logging.getLogger("uvicorn").handlers[:] = []
