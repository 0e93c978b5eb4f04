"""Group commit of audit entries, by the audit writer process when the server runs one.

Every request's entry must be committed before its response is sent.

* When one request is in flight, nothing could share its transaction, so its entry is committed
  at once, on the event loop (no hand-off on the latency path).
* When several are, entries are queued and sent together, once per turn of the event loop, to
  the audit writer (``audit_writer.py``), a child process that commits every batch it has
  received by then in one transaction and acknowledges each. A request goes on only once the
  transaction holding its own entry has committed.

Why a process: a transaction's cost is mostly SQLite's, and the chain hash and HMAC come on top;
on the event loop that work stopped every other request, and a thread would share the loop's
GIL (measured: worse than no thread, ``bench/README.md``). Without a writer (not started, a
different event loop, or the writer died and is being restarted) the batch is committed on the
event loop, as before: slower, never unrecorded."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any, cast

import orjson

from inhouse.errors import AuditUnavailableError
from inhouse.security.audit import AuditEntry, AuditLog
from inhouse.security.audit_writer import frame, take_frame

log = logging.getLogger(__name__)

_Waiters = list[asyncio.Future[None]]
_STOP_TIMEOUT_S = 30.0  # for the writer to commit what it has after its input closed


class _Done:
    """An awaitable that is already done (an entry committed at once, or none to commit)."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


DONE: Awaitable[None] = _Done()


_REFUSED = ("The audit log cannot be written, so this request was refused rather than answered unrecorded; "
            "free space in the server's data directory (or fix its storage) and retry.")


class AuditWriteError(AuditUnavailableError):
    """An entry could not be committed. The client sees a fixed message (503, code 4050); the
    reason (``reason``: SQLite's or the audit writer's words) goes to the server log."""

    def __init__(self, message: str = _REFUSED, *, headers: dict[str, str] | None = None,
                 details: dict[str, Any] | None = None, reason: str = "") -> None:
        super().__init__(message, headers={"Retry-After": "1"} if headers is None else headers, details=details)
        self.reason = reason


class _WriterProtocol(asyncio.SubprocessProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.SubprocessTransport | None = None
        self.ready: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.awaiting: collections.deque[_Waiters] = collections.deque()
        self.on_idle: Callable[[], None] | None = None  # called when no batch awaits its commit any more
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)  # uvloop's is not a subclass

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or isinstance(data, str):
            return
        self._buf += data
        while (reply := take_frame(self._buf)) is not None:
            if not self.ready.done():
                self.ready.set_result(reply)
            elif self.awaiting:
                error = None
                if reply:
                    error = AuditWriteError(reason=reply.decode(errors="replace"))
                    log.error("the audit log could not be written; refusing the requests of this batch",
                              extra={"reason": error.reason})
                _resolve(self.awaiting.popleft(), error)
        if not self.awaiting and self.on_idle is not None:
            self.on_idle()

    def process_exited(self) -> None:
        error = AuditWriteError(reason="the audit writer process exited before committing these entries")
        if not self.ready.done():
            self.ready.set_result(b"the audit writer process exited while starting")
        while self.awaiting:
            _resolve(self.awaiting.popleft(), error)
        if not self.exited.done():
            self.exited.set_result(None)
        if self.on_idle is not None:  # what waited behind the lost batch: committed on the event loop
            self.on_idle()

    def write(self, payload: bytes) -> bool:
        """One frame to the writer's stdin; False when it cannot take any more."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.exited.done():
            return False
        stdin = cast(asyncio.WriteTransport | None, transport.get_pipe_transport(0))  # uvloop's: no subclass
        if stdin is None or stdin.is_closing():
            return False
        stdin.write(frame(payload))
        return True

    def send(self, payload: bytes, batch: _Waiters) -> bool:
        if not self.write(payload):
            return False
        self.awaiting.append(batch)
        return True


class GroupCommitter:
    """``in_flight`` is kept by the caller (the security gate): requests admitted whose entry
    is not written yet. ``commits`` and ``entries`` count batches and entries, ``by_writer``
    the entries the writer process committed."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._pending: list[AuditEntry] = []
        self._waiters: _Waiters = []  # the pending entries' requests, in the same order
        self._writer: _WriterProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the writer's
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._flush_due = False  # a _flush is scheduled
        self._args: tuple[bytes, Path, bool] | None = None
        self._restart: asyncio.Task[None] | None = None
        self._closing = False
        self.in_flight = 0
        self.commits = 0
        self.entries = 0
        self.by_writer = 0

    @property
    def writer_pid(self) -> int | None:
        w = self._writer
        return None if w is None or w.transport is None else w.transport.get_pid()

    async def start(self, secret: bytes, data_dir: Path, fsync: bool) -> bool:
        """Start the audit writer process; False (and a warning) if it could not start, in
        which case entries are committed on the event loop."""
        self._args = (secret, data_dir, fsync)
        loop = asyncio.get_running_loop()
        argv = [sys.executable, "-m", "inhouse.security.audit_writer", str(data_dir), *(["--fsync"] if fsync else [])]
        writer: _WriterProtocol | None = None
        try:
            _, writer = await loop.subprocess_exec(_WriterProtocol, *argv, stdin=asyncio.subprocess.PIPE,
                                                   stdout=asyncio.subprocess.PIPE, stderr=None)
            # the secret goes down the pipe, never on a command line or in the environment
            problem = await asyncio.wait_for(asyncio.shield(writer.ready), 60) if writer.write(secret) \
                else b"its input pipe closed"
        except (OSError, TimeoutError) as exc:
            problem = str(exc).encode() or type(exc).__name__.encode()
        if self._closing:  # close() ran meanwhile (a restart racing the server's stop)
            problem = b"the audit log is closing"
        if problem or writer is None:
            log.warning("the audit writer process did not start; audit entries are committed on the event loop",
                        extra={"reason": problem.decode(errors="replace")})
            if writer is not None and writer.transport is not None:
                writer.transport.close()
            return False
        self._writer, self._loop = writer, loop
        writer.on_idle = self._writer_idle
        started = writer
        writer.exited.add_done_callback(lambda _: self._writer_exited(started))
        return True

    def _writer_exited(self, writer: _WriterProtocol) -> None:
        if self._writer is not writer:
            return
        self._writer = None
        if self._closing or self._args is None:
            return
        log.error("the audit writer process exited; restarting it (entries are committed on the event loop "
                  "meanwhile)")
        self._restart = asyncio.ensure_future(self._start_again())

    async def _start_again(self) -> None:
        await asyncio.sleep(1.0)
        if not self._closing and self._writer is None and self._args is not None:
            await self.start(*self._args)

    def commit(self, entry: AuditEntry) -> Awaitable[None]:
        """What to await until ``entry`` is committed (already done when it was committed at
        once); raises, or the awaitable raises, what prevented it. Not a coroutine: a request
        awaits the future itself, without two more frames to create and resume."""
        writer = self._writer
        if not self._pending:
            if self.in_flight <= 0 and (writer is None or not writer.awaiting):
                self._write([entry])  # alone: nothing could share its transaction
                return DONE
            loop = asyncio.get_running_loop()
            self._pending_loop = loop
        else:
            loop = asyncio.get_running_loop()
            if loop is not self._pending_loop:
                self._write([entry])
                return DONE
        future: asyncio.Future[None] = loop.create_future()  # its own: a cancelled request cancels only it
        self._pending.append(entry)
        self._waiters.append(future)
        if not self._flush_due and (writer is None or not writer.awaiting or loop is not self._loop):
            # Sent at the end of this turn of the event loop, with the entries of the requests
            # finishing in it. While the writer is committing a batch, entries wait for it to
            # finish instead (``_writer_idle``): one batch in flight at a time, so a busy server
            # sends fewer, larger batches and spends fewer pipe reads and writes per entry.
            self._flush_due = True
            loop.call_soon(self._flush)
        return future

    def _writer_idle(self) -> None:
        if self._pending and not self._flush_due and self._pending_loop is self._loop:
            self._flush()

    def _flush(self) -> None:
        self._flush_due = False
        if not self._pending:
            return
        entries, self._pending = self._pending, []
        batch, self._waiters = self._waiters, []
        writer = self._writer
        if writer is not None and self._pending_loop is self._loop:
            try:  # each entry a JSON array of its fields (the writer rebuilds it with AuditEntry(*item))
                payload = orjson.dumps(entries, default=tuple)
            except TypeError:  # a detail JSON cannot carry: the event loop's own write reports it
                payload = b""
            if payload and writer.send(payload, batch):
                self.commits += 1
                self.entries += len(entries)
                self.by_writer += len(entries)
                return
        try:  # no writer (for this event loop) right now: on the event loop
            self._write(entries)
        except Exception as exc:  # every request of the batch fails: none of them goes unrecorded
            _resolve(batch, exc)
            return
        _resolve(batch, None)

    def _write(self, entries: list[AuditEntry]) -> None:
        try:
            self._log.append_many(entries)
        except (sqlite3.Error, OSError) as exc:  # nothing of the batch was written: its requests are refused
            error = AuditWriteError(reason=f"{type(exc).__name__}: {exc}")
            log.error("the audit log could not be written; refusing the requests of this batch",
                      extra={"reason": error.reason})
            raise error from exc
        self.commits += 1
        self.entries += len(entries)

    async def close(self) -> None:
        """Send what is queued, let the writer commit it and stop."""
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
        if self._pending:
            self._flush()
        writer, self._writer = self._writer, None
        if writer is None or writer.transport is None:
            return
        stdin = writer.transport.get_pipe_transport(0)
        if stdin is not None:
            stdin.close()  # end of input: the writer commits what it has and exits
        try:
            await asyncio.wait_for(asyncio.shield(writer.exited), _STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("the audit writer did not stop in time; killing it")
        with contextlib.suppress(ProcessLookupError):
            writer.transport.close()
        log.info("audit log: %d entries committed in %d batches", self.entries, self.commits)


def _resolve(futures: _Waiters, error: Exception | None) -> None:
    for future in futures:
        if future.done():  # its request was cancelled
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


__all__ = ["AuditWriteError", "GroupCommitter"]
