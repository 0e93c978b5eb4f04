"""The audit writer: a child process of the server that commits audit entries to the audit log,
so that SQLite's work (the inserts, the head record, the WAL write, COMMIT) and the chain hash
and HMAC run beside the event loop instead of on it, and without sharing its GIL.

    python -m inhouse.security.audit_writer DATA_DIR [--fsync]

Its only input is stdin and its only output stdout, both as frames: a 4-byte big-endian length,
then the bytes. The first frame in is the server secret; the writer opens the log and answers
one empty frame (ready) or an error text. Every later frame in is a JSON list of entries; the
writer commits every frame it has received by then in one transaction, then answers each frame
in order: an empty frame once its entries are committed, or the error text. End of input (the
server closed the pipe, exited or was killed) is the only way it stops; it ignores SIGINT and
SIGTERM so that the server can still record the requests it drains while it shuts down."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from inhouse.security.audit import AuditEntry, AuditLog

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


def take_frame(buf: bytearray) -> bytes | None:
    """The first complete frame in ``buf`` (removed from it), or None while it is incomplete.
    Both ends read frames with this: the writer its input, the server the writer's answers."""
    if len(buf) < 4:
        return None
    (size,) = _HEADER.unpack_from(buf)
    if size > MAX_FRAME:
        raise ValueError(f"an audit frame of {size} bytes is over the limit of {MAX_FRAME}")
    if len(buf) < 4 + size:
        return None
    payload = bytes(buf[4:4 + size])
    del buf[:4 + size]
    return payload


POLL_S = 0.001
"""While input keeps coming, the writer looks for more this often instead of blocking on the pipe
(0.2 ms was tried: 5,000 wake-ups a second on a 2-core machine took CPU from the event loop,
and the security layer's c=64 cost varied between 4 % and 15 % from run to run; with 1 ms, 6–9 %
and a smaller p50 cost, as batches grow: ``bench/README.md``)."""
BUSY_S = 0.05
"""...for this long after the last input; then it blocks until more arrives."""


class FrameReader:
    """Frames from a file descriptor (blocking for the first, then only what is already there).

    A process blocked reading a pipe must be woken by the writing process, and on a busy
    machine that wake-up is most of what a pipe write costs the writer (measured: 6 µs against
    1.6 µs for a write into a pipe whose reader is asleep on a timer, more under load). The
    server writes from its event loop, so while entries keep coming the reader polls instead
    (every ``poll_s``) and the server's writes wake nobody; after ``busy_s`` without input it
    blocks again, so an idle server's writer costs nothing."""

    def __init__(self, fd: int, poll_s: float = POLL_S, busy_s: float = BUSY_S) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._poll_s = poll_s
        self._busy_s = busy_s
        self._last = -busy_s  # monotonic time of the last input
        self.eof = False

    def _readable(self) -> bool:
        return bool(select.select([self._fd], [], [], 0)[0])

    def _wait(self) -> None:
        """Until there is input: polling while recent input suggests more is coming, else blocking."""
        while time.monotonic() - self._last < self._busy_s:
            time.sleep(self._poll_s)
            if self._readable():
                return
        select.select([self._fd], [], [])

    def next(self, *, block: bool) -> bytes | None:
        """The next frame; None at the end of input, or (``block=False``) when none is complete."""
        while (payload := take_frame(self._buf)) is None:
            if self.eof:
                return None
            if not self._readable():
                if not block:
                    return None
                self._wait()
            data = os.read(self._fd, 1 << 16)
            self._last = time.monotonic()
            if not data:
                self.eof = True
                return None
            self._buf += data
        return payload


def entry_from(item: list[Any]) -> AuditEntry:
    """An entry from the JSON array the server sent (``AuditEntry``'s fields in order)."""
    if not isinstance(item, list) or not 1 <= len(item) <= len(AuditEntry._fields):
        raise ValueError("an audit entry must be an array of the entry's fields")
    return AuditEntry(*item)


def serve(data_dir: Path, fsync: bool, fd_in: int, out: Any) -> int:
    reader = FrameReader(fd_in)
    secret = reader.next(block=True)
    if secret is None:
        return 0
    try:
        log = AuditLog(data_dir, secret, fsync=fsync, background_checkpoint=True)
    except Exception as exc:  # reported to the server, which keeps writing on its own
        out.write(frame(f"{type(exc).__name__}: {exc}".encode()))
        out.flush()
        return 1
    out.write(frame(b""))
    out.flush()
    try:
        while (first := reader.next(block=True)) is not None:
            frames = [first]
            while (more := reader.next(block=False)) is not None:
                frames.append(more)
            replies: list[bytes] = []
            entries: list[AuditEntry] = []
            for payload in frames:
                try:
                    entries.extend(entry_from(item) for item in orjson.loads(payload))
                    replies.append(b"")
                except Exception as exc:  # that frame alone is refused
                    replies.append(f"an audit frame could not be read: {exc}".encode())
            if entries:
                try:
                    log.append_many(entries)
                except Exception as exc:  # nothing of this transaction was written: every frame fails
                    error = f"{type(exc).__name__}: {exc}".encode()
                    replies = [error for _ in replies]
            out.write(b"".join(frame(r) for r in replies))
            out.flush()
    finally:
        log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inhouse.security.audit_writer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--fsync", action="store_true", help="synchronous=FULL: survive power loss too")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(os, "SCHED_BATCH"):  # Linux: woken by the server, wait for a free core rather than preempt it
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    return serve(args.data_dir, args.fsync, sys.stdin.buffer.fileno(), sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
