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
    now = [610.0]  # 10 s into a one-minute window
    limiter = RateLimiter(clock=lambda: now[0])
    assert [_retry(limiter, "3/minute") for _ in range(3)] == [None] * 3
    assert _retry(limiter, "3/minute") == 50  # full until this window ends
    assert _retry(limiter, "3/minute", bucket="other") is None  # another key is counted apart
    now[0] += 60  # next window: the 3 earlier requests still weigh 3 × 50/60 = 2.5
    assert _retry(limiter, "3/minute") == 10  # until one of them (20 s each) has slid out
    now[0] += 10  # weight 3 × 40/60 = 2: one more fits
    assert _retry(limiter, "3/minute") is None
    wait = _retry(limiter, "3/minute")
    assert wait is not None and 1 <= wait <= 60
    now[0] += 120  # two idle windows later nothing counts
    assert [_retry(limiter, "3/minute") for _ in range(3)] == [None] * 3


def test_rates_are_parsed_and_idle_buckets_forgotten() -> None:
    now = [1.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert _retry(limiter, "2/5s") is None and _retry(limiter, "2/5s") is None
    assert _retry(limiter, "2/5s") == 4  # the 5 s window ends
    for i in range(RateLimiter._PRUNE_EVERY):
        now[0] += 0.01
        limiter.check("1000000/s", f"ip:{i}", "test")
    assert len(limiter) < RateLimiter._PRUNE_EVERY  # seconds-old buckets were dropped
    with pytest.raises(ValueError):
        limiter.check("fast", "k", "test")
