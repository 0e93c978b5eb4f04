"""The rate syntax (``200/s``, ``1000/min``, ``50 per hour``): parsed where settings are
validated and where requests are counted, so it sits below both."""

from __future__ import annotations

import re
from functools import lru_cache

import limits

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
