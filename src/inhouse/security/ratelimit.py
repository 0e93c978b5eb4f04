"""Rate limits per API key and per client IP, on the ``limits`` library (sliding-window
counters in memory: one process per machine is the unit). The asyncio flavour of its memory
storage is used: the threaded one starts a timer thread every few milliseconds under load."""

from __future__ import annotations

import math
import re
import time
from functools import lru_cache

import limits
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from inhouse.errors import RateLimitedError

_UNITS = {"s": "second", "sec": "second", "second": "second", "m": "minute", "min": "minute",
          "minute": "minute", "h": "hour", "hour": "hour", "d": "day", "day": "day"}
_RATE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+)?\s*([a-z]+?)s?\s*$")


@lru_cache(maxsize=256)
def parse_rate(text: str) -> limits.RateLimitItem:
    """``200/s``, ``1000/min``, ``50 per hour``, ``10/5s`` → a rate-limit item."""
    m = _RATE.match(text.lower())
    unit = _UNITS.get(m.group(3)) if m else None
    if m is None or unit is None or int(m.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a rate; write COUNT/UNIT, e.g. 200/s, 1000/min, 50/hour.")
    return limits.parse(f"{int(m.group(1))}/{m.group(2) or ''}{unit}".replace("//", "/"))


class RateLimiter:
    def __init__(self) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())

    async def hit(self, rate: str, bucket: str, who: str) -> None:
        """Count one request for ``bucket``; raise 4029 with Retry-After when over ``rate``."""
        item = parse_rate(rate)
        if await self._limiter.hit(item, bucket):
            return
        reset = (await self._limiter.get_window_stats(item, bucket)).reset_time
        retry = max(1, math.ceil(reset - time.time()))
        raise RateLimitedError(
            f"Rate limit {rate} exceeded for {who}; retry after {retry} s.", headers={"Retry-After": str(retry)})
