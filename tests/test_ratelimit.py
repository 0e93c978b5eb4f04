"""The sliding-window rate limiter on a fake clock: counts, the weighted previous window,
Retry-After, buckets kept apart, idle buckets forgotten."""

from __future__ import annotations

import pytest

from inhouse.errors import RateLimitedError
from inhouse.security.ratelimit import RateLimiter


def _retry(limiter: RateLimiter, rate: str, bucket: str = "k") -> int | None:
    try:
        limiter.check(rate, bucket, "test")
    except RateLimitedError as err:
        assert err.code == 4029
        return int(err.headers["Retry-After"])
    return None


def test_sliding_window_counts_and_retry_after() -> None:
    now = [600.0]  # the start of a one-minute window
    limiter = RateLimiter(clock=lambda: now[0])
    assert [_retry(limiter, "3/minute") for _ in range(3)] == [None] * 3
    wait = _retry(limiter, "3/minute")
    # full until this window ends, then the previous window's weight must fall to 2 of 3
    assert wait == 60 + 20
    assert _retry(limiter, "3/minute", bucket="other") is None  # another key is counted apart
    now[0] += 60  # next window: the 3 earlier requests still weigh 3 × (60 - 0) / 60 = 3
    assert _retry(limiter, "3/minute") == 20
    now[0] += 20  # weight 3 × 40/60 = 2: one more fits
    assert _retry(limiter, "3/minute") is None
    assert _retry(limiter, "3/minute") is not None
    now[0] += 120  # two idle windows later nothing counts
    assert [_retry(limiter, "3/minute") for _ in range(3)] == [None] * 3


def test_rates_are_parsed_and_idle_buckets_forgotten() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert _retry(limiter, "2/5s") is None and _retry(limiter, "2/5s") is None
    assert _retry(limiter, "2/5s") == 5 + 3  # ceil(5 - 0 + 5 × (1 - 1/2))
    for i in range(RateLimiter._PRUNE_EVERY):
        now[0] += 0.01
        limiter.check("1000000/s", f"ip:{i}", "test")
    assert len(limiter) < RateLimiter._PRUNE_EVERY  # seconds-old buckets were dropped
    with pytest.raises(ValueError):
        limiter.check("fast", "k", "test")
