"""The sliding-window rate limiter on a fake clock: counts, the weighted previous window,
Retry-After, buckets kept apart, idle buckets forgotten; and its shared form, two "workers"
mapping one file: one count for both, the same answers as the in-process limiter."""

from __future__ import annotations

from pathlib import Path

import pytest

from inhouse.errors import RateLimitedError
from inhouse.security.ratelimit import RateLimiter, SharedRateLimiter


def _retry(limiter: RateLimiter | SharedRateLimiter, rate: str, bucket: str = "k") -> int | None:
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


def test_shared_limiter_counts_once_for_every_worker(tmp_path: Path) -> None:
    now = [610.0]
    a, b = (SharedRateLimiter(tmp_path / "rates.bin", i, 2, clock=lambda: now[0]) for i in range(2))
    assert [_retry(w, "4/minute") for w in (a, b, a, b)] == [None] * 4
    assert _retry(a, "4/minute") == 50 and _retry(b, "4/minute") == 50  # full for both
    assert _retry(b, "4/minute", bucket="other") is None  # another key is counted apart
    now[0] += 60  # next window: 4 × 50/60 weigh 3.33, so nothing fits until 10 s have passed
    assert _retry(a, "4/minute") is not None
    now[0] += 15  # 4 × 35/60 = 2.33: one more fits, then b sees a's
    assert _retry(b, "4/minute") is None
    assert _retry(a, "4/minute") is not None
    now[0] += 120  # two idle windows later nothing counts
    assert [_retry(w, "4/minute") for w in (b, a, b, a)] == [None] * 4


def test_shared_limiter_answers_like_the_local_one(tmp_path: Path) -> None:
    """One worker alone, over many windows and rates: the same admit / refuse / Retry-After as
    the in-process counter at every step."""
    now = [1000.0]
    local = RateLimiter(clock=lambda: now[0])
    shared = SharedRateLimiter(tmp_path / "rates.bin", 0, 1, clock=lambda: now[0])
    for step in range(3000):
        now[0] += (step * 7919 % 13) / 10  # 0 to 1.2 s apart, irregular
        rate = ("5/10s", "20/minute", "3/s")[step % 3]
        assert _retry(shared, rate) == _retry(local, rate), (step, rate)


def test_shared_limiter_reuses_idle_slots_and_falls_back_when_full(tmp_path: Path) -> None:
    class Small(SharedRateLimiter):
        SLOTS = 16
        _PROBES = 16

    now = [100.0]
    a = Small(tmp_path / "small.bin", 0, 2, clock=lambda: now[0])
    b = Small(tmp_path / "small.bin", 1, 2, clock=lambda: now[0])
    for i in range(16):
        assert _retry(a, "1/hour", bucket=f"ip:{i}") is None
    assert len(a) == 16
    assert _retry(b, "1/hour", bucket="ip:3") is not None  # b finds a's count
    # the table is full of busy hourly buckets: a new one is counted in this process only
    assert _retry(a, "1/hour", bucket="new") is None and _retry(a, "1/hour", bucket="new") is not None
    assert _retry(b, "1/hour", bucket="new") is None
    now[0] += 3 * 3600  # every slot idle for two of its windows: reused
    assert _retry(b, "1/minute", bucket="fresh") is None and _retry(a, "1/minute", bucket="fresh") is not None
    # an hourly bucket still in its window is never taken over by a shorter one
    now[0] += 5
    assert _retry(a, "1/hour", bucket="ip:0") is None
    now[0] += 200
    for i in range(40):
        _retry(b, "1/s", bucket=f"short:{i}")
    assert _retry(b, "1/hour", bucket="ip:0") is not None
