"""Rate limits per API key and per client IP: sliding-window counters in memory, or, with
several worker processes, in a file every worker maps (:class:`SharedRateLimiter`), so that a
key's rate holds for the server and not per worker. Rates are parsed by the ``limits`` library; the counting is the
algorithm of its ``SlidingWindowCounterRateLimiter`` (this window's count plus the previous
window's, weighted by how much of it is still inside the sliding window), done here in a plain
dict on the event loop: its asyncio storage costs locks, awaits and expiry timers on every
request, several times the rest of the security check on a small model (``bench/README.md``)."""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from inhouse.errors import RateLimitedError
from inhouse.rates import parse_rate as parse_rate  # re-exported: key files name rates too

log = logging.getLogger(__name__)


@lru_cache(maxsize=256)
def _limit(rate: str) -> tuple[int, float]:
    """(requests, seconds) of a rate."""
    item = parse_rate(rate)
    return item.amount, float(item.get_expiry())


class _Window:
    __slots__ = ("count", "previous", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.previous = 0


class RateLimiter:
    """Callers run on one event loop (no locks). ``clock`` is injectable for tests."""

    _PRUNE_EVERY = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._hits = 0

    def check(self, rate: str, bucket: str, who: str) -> None:
        """Count one request for ``bucket``; raise 4029 with Retry-After when over ``rate``."""
        amount, period = _limit(rate)
        now = self._clock()
        self._hits += 1
        if self._hits % self._PRUNE_EVERY == 0:
            self._prune(now)
        key = (rate, bucket)
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(now - now % period)
        elif now >= w.start + period:
            passed = int((now - w.start) // period)
            w.previous = w.count if passed == 1 else 0
            w.count = 0
            w.start += passed * period
        elapsed = now - w.start
        if w.previous * (period - elapsed) / period + w.count + 1 <= amount:
            w.count += 1
            return
        retry = max(1, math.ceil(round(self._wait(w, amount, period, elapsed), 6)))
        raise RateLimitedError(
            f"Rate limit {rate} exceeded for {who}; retry after {retry} s.", headers={"Retry-After": str(retry)})

    @staticmethod
    def _wait(w: _Window, amount: int, period: float, elapsed: float) -> float:
        """Seconds until the count next drops (the estimate ``limits`` reports as the window's
        reset time): one request's weight leaving the previous window, or this window ending."""
        previous = (period - elapsed) % (period / w.previous) if w.previous else math.inf
        current = (2 * period - elapsed) % period if w.count else math.inf
        return min(previous, current)

    def _prune(self, now: float) -> None:
        """Forget buckets idle for two whole windows (they count nothing any more)."""
        stale = [k for k, w in self._windows.items()
                 if now >= w.start + 2 * _limit(k[0])[1]]
        for k in stale:
            del self._windows[k]

    def __len__(self) -> int:
        return len(self._windows)


class SharedRateLimiter:
    """The same sliding-window counter, shared by the worker processes of one server through a
    file each maps. Slot ``i`` of the table is a bucket (its 64-bit name hash and its period);
    each worker writes only its own cells of a slot (window start, this window's count, the
    previous one's), so no lock is needed, and a check adds every worker's cells up. Windows
    start on wall-clock multiples of the period, the same in every process. Two workers admitting
    at the same instant can each take the last request a window allows: a burst may pass the
    rate by at most one per worker, never by a multiple of it. A slot idle for two of its windows
    is reused; when the probed slots are all busy, the bucket is counted in this process only
    (logged once)."""

    SLOTS = 1 << 16
    _PROBES = 16

    def __init__(self, path: Path, index: int, count: int, clock: Callable[[], float] = time.time) -> None:
        self._index = index
        self._count = count
        self._clock = clock
        size = self.SLOTS * 8 * (2 + 3 * count)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # every worker asks for the same size; zeros are empty slots
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        view = memoryview(self._map)
        n = self.SLOTS * 8
        self._names = view[:n].cast("Q")
        self._periods = view[n: 2 * n].cast("d")
        self._cells = view[2 * n:].cast("d")  # [worker][slot][start, count, previous]
        self._slots: dict[tuple[str, str], tuple[int, int]] = {}  # bucket -> (slot, name)
        self._local = RateLimiter(clock)
        self._full_logged = False

    def _cell(self, worker: int, slot: int) -> int:
        return (worker * self.SLOTS + slot) * 3

    def _slot(self, key: tuple[str, str], now: float, period: float) -> int | None:
        known = self._slots.get(key)
        if known is not None and self._names[known[0]] == known[1]:
            return known[0]
        name = int.from_bytes(hashlib.blake2b(f"{key[0]}|{key[1]}".encode(), digest_size=8).digest(), "little") or 1
        first = name % self.SLOTS
        for i in range(self._PROBES):
            slot = (first + i) % self.SLOTS
            held = self._names[slot]
            if held == name:
                break
            if held == 0 or self._idle(slot, now):
                for w in range(self._count):
                    c = self._cell(w, slot)
                    self._cells[c] = self._cells[c + 1] = self._cells[c + 2] = 0.0
                self._periods[slot] = period
                self._names[slot] = name
                break
        else:
            if not self._full_logged:
                self._full_logged = True
                log.warning("rate-limit table full: new buckets are counted per worker", extra={"slots": self.SLOTS})
            return None
        if len(self._slots) >= self.SLOTS:  # the bucket -> slot memo stays bounded
            self._slots.clear()
        self._slots[key] = (slot, name)
        return slot

    def _idle(self, slot: int, now: float) -> bool:
        """No worker counted in the slot for two of its windows: it counts nothing any more."""
        period = self._periods[slot]
        return all(self._cells[self._cell(w, slot)] + 2 * period <= now for w in range(self._count))

    def check(self, rate: str, bucket: str, who: str) -> None:
        """Count one request for ``bucket``; raise 4029 with Retry-After when over ``rate``."""
        amount, period = _limit(rate)
        now = self._clock()
        slot = self._slot((rate, bucket), now, period)
        if slot is None:
            self._local.check(rate, bucket, who)
            return
        start = now - now % period
        cells = self._cells
        mine = self._cell(self._index, slot)
        if cells[mine] != start:  # this worker's first request in the window: roll its cells
            cells[mine + 2] = cells[mine + 1] if cells[mine] == start - period else 0.0
            cells[mine + 1] = 0.0
            cells[mine] = start
        count = previous = 0.0
        for w in range(self._count):
            c = self._cell(w, slot)
            if cells[c] == start:
                count += cells[c + 1]
                previous += cells[c + 2]
            elif cells[c] == start - period:
                previous += cells[c + 1]
        elapsed = now - start
        if previous * (period - elapsed) / period + count + 1 <= amount:
            cells[mine + 1] += 1
            return
        window = _Window(start)
        window.count, window.previous = int(count), int(previous)
        retry = max(1, math.ceil(round(RateLimiter._wait(window, amount, period, elapsed), 6)))
        raise RateLimitedError(
            f"Rate limit {rate} exceeded for {who}; retry after {retry} s.", headers={"Retry-After": str(retry)})

    def __len__(self) -> int:
        return sum(1 for x in self._names if x)
