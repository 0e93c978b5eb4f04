"""Rate limits per API key and per client IP: sliding-window counters in memory (one process
per machine is the unit). Rates are parsed by the ``limits`` library; the counting is the
algorithm of its ``SlidingWindowCounterRateLimiter`` (this window's count plus the previous
window's, weighted by how much of it is still inside the sliding window), done here in a plain
dict on the event loop: its asyncio storage costs locks, awaits and expiry timers on every
request, several times the rest of the security check on a small model (``bench/README.md``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import lru_cache

from inhouse.errors import RateLimitedError
from inhouse.rates import parse_rate as parse_rate  # re-exported: key files name rates too


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
