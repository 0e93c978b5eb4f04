"""Group commit of audit entries on the event loop.

Every request's entry must be committed before its response is sent. When one request is in
flight, nothing could share its transaction, so its entry is committed at once. When several
are, an entry is queued and committed in one transaction with the entries of every other
request that reaches the same point before the next turn of the event loop; each request goes
on only once the transaction holding its own entry has committed. One transaction per batch
instead of one per entry: the per-commit cost (the WAL write, the head record, BEGIN and
COMMIT) is most of an entry's cost (``bench/README.md``)."""

from __future__ import annotations

import asyncio

from inhouse.security.audit import AuditEntry, AuditLog


class GroupCommitter:
    """``in_flight`` is kept by the caller (the security gate): requests admitted whose entry
    is not written yet. ``commits`` and ``entries`` count transactions and entries."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._pending: list[tuple[AuditEntry, asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        self.commits = 0
        self.entries = 0

    async def commit(self, entry: AuditEntry) -> None:
        """Return once ``entry`` is committed; raise what the audit log raised if it could not be."""
        loop = asyncio.get_running_loop()
        if (self.in_flight <= 0 and not self._pending) or (self._pending and loop is not self._loop):
            self._write([entry])
            return
        future: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            self._loop = loop
            loop.call_soon(self._flush)
        self._pending.append((entry, future))
        await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            self._write([entry for entry, _ in batch])
        except Exception as exc:  # every request of the batch fails: none of them goes unrecorded
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    def _write(self, entries: list[AuditEntry]) -> None:
        self._log.append_many(entries)
        self.commits += 1
        self.entries += len(entries)
