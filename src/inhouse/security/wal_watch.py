"""A cheap first answer to "has any connection committed to this SQLite database since I last
looked?" for a database in WAL mode, read on every request by the key store.

Every commit rewrites the wal-index header at the start of the ``-shm`` file (its frame count,
checksums and change counter; a WAL reset changes its salts: https://www.sqlite.org/walformat.html,
"The WAL-Index Header"), and every connection to the database, in any process, shares that
file through a memory mapping. Comparing its first 48 bytes with the copy taken at the last
check is a memory read; ``PRAGMA data_version``, the authority, takes and drops a lock (two
``fcntl`` calls) and costs ~25 µs per request on the hot path. A changed header (or a torn
read of one being written) only means "ask SQLite"; so does a header older than ``max_age``
seconds, and anything unusual (no ``-shm`` file, not WAL) turns the watch off."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

_HEADER = 48  # the first of the wal-index header's two copies


class WalWatch:
    def __init__(self, db_path: Path, max_age: float = 1.0) -> None:
        self._max_age = max_age
        self._map: mmap.mmap | None = None
        self._seen: bytes | None = None
        self._at = 0.0
        try:
            with open(f"{db_path}-shm", "rb") as f:
                self._map = mmap.mmap(f.fileno(), _HEADER, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            self._map = None

    def unchanged(self) -> bool:
        """True only when nothing can have been committed since :meth:`seen` was last called."""
        return (self._seen is not None and self._map is not None and self._map[:_HEADER] == self._seen
                and time.monotonic() - self._at < self._max_age)

    def header(self) -> bytes | None:
        """The header now: take it *before* asking SQLite, then pass it to :meth:`seen`."""
        return self._map[:_HEADER] if self._map is not None else None

    def seen(self, header: bytes | None) -> None:
        self._seen = header
        self._at = time.monotonic()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._seen = None
