"""The control channel between the supervisor and its workers: JSON messages in length-prefixed
frames over a Unix stream socket, requests and answers in both directions on one connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from inhouse import errors
from inhouse.errors import InhouseError, InternalError

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 << 20  # a metrics exposition of many models stays far below this

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ChannelClosedError(ConnectionError):
    """The other end of the control channel went away."""


def error_doc(err: BaseException) -> dict[str, Any]:
    """An error as the other end rebuilds it: its class (when it is one of ours), code and message."""
    if isinstance(err, InhouseError):
        return {"class": type(err).__name__, "message": err.message, "details": err.details,
                "headers": err.headers}
    return {"class": "InternalError", "message": f"A worker failed: {type(err).__name__}.", "details": {},
            "headers": {}}


def rebuild_error(doc: dict[str, Any]) -> InhouseError:
    cls = getattr(errors, str(doc.get("class", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, InhouseError)):
        cls = InternalError
    return cls(str(doc.get("message", "")), details=doc.get("details") or {}, headers=doc.get("headers") or {})


class Channel:
    """One connection. ``request`` sends an operation and waits for its answer; operations from
    the other end go to ``handler``, each in its own task (a slow load must not hold up a scrape)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.closed_callback: Callable[[], None] | None = None  # called once the other end is gone
        self._reading = asyncio.create_task(self._read_loop())

    async def request(self, op: str, limit_s: float | None = None, **args: Any) -> Any:
        if self.closed.is_set():
            raise ChannelClosedError("the control channel is closed")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._send({"id": rid, "op": op, "args": args})
            return await asyncio.wait_for(fut, limit_s)
        finally:
            self._waiting.pop(rid, None)

    def _send(self, doc: dict[str, Any]) -> None:
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        self._writer.write(_HEADER.pack(len(body)) + body)

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(4)
                (size,) = _HEADER.unpack(head)
                if size > MAX_FRAME:
                    raise ValueError(f"a control frame of {size} bytes is over the limit")
                doc = orjson.loads(await self._reader.readexactly(size))
                if "op" in doc:
                    task = asyncio.create_task(self._answer(doc))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    fut = self._waiting.get(doc.get("id", 0))
                    if fut is not None and not fut.done():
                        if doc.get("ok"):
                            fut.set_result(doc.get("result"))
                        else:
                            fut.set_exception(rebuild_error(doc.get("error") or {}))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError):
            pass
        finally:
            self.closed.set()
            if self.closed_callback is not None:
                self.closed_callback()
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ChannelClosedError("the control channel closed before the answer came"))

    async def _answer(self, doc: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": doc.get("id")}
        try:
            reply["result"] = await self._handler(str(doc["op"]), doc.get("args") or {})
            reply["ok"] = True
        except Exception as err:  # every failure goes back as an answer, never kills the channel
            if not isinstance(err, InhouseError):
                log.exception("control operation failed", extra={"op": doc.get("op")})
            reply["ok"], reply["error"] = False, error_doc(err)
        if not self.closed.is_set():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._send(reply)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
