"""Whether a model with nothing running holds its queue for company (up to the queue delay)
instead of running a lone request at once, and the reading of the event loop's load it rests on.

An idle model runs a lone request at once, so that it does not sit out the queue delay. That is
right while requests reach it in bursts that batch, but a front end that hands the loop one
request per turn makes each one run alone and pay a model call and its hand-offs. Waiting pays
only when the loop is saturated (the requests are waiting at the front end anyway) and more keep
coming than one call holds: with few clients, all of them are soon in the held batch and the
rest of the wait is lost. So: only on a saturated loop; a wait, once begun, runs to its end and is
judged: one that found company until near its end keeps waiting on; one that did not stops it,
and a wait is tried again after a back-off (20 ms doubling to 1 s)."""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable
from typing import Protocol

# A loop is saturated when it ran or waited for a CPU this share of the last window.
SATURATED_SHARE = 0.85
LOAD_WINDOW_S = 0.02
# After a wait that found no company, none again for a back-off doubling from the first to the second.
PROBE_BACKOFF_S = (0.02, 1.0)
# A wait paid if requests still arrived in its last quarter.
_PAID_AFTER = 0.75


def _thread_busy_clock() -> tuple[Callable[[], float], int | None]:
    """A clock of the seconds the calling thread has been running *or runnable* (waiting for a
    CPU): the first two fields of ``/proc/thread-self/schedstat`` on Linux, read with one
    ``pread`` (about 1 µs); elsewhere, its CPU time. Counting the time spent runnable matters on
    a machine whose cores are shared: a loop that always has work but is preempted (by the
    model's threads, or a load generator) is as saturated as one that runs all the time.
    Returns the clock and the file descriptor it reads, if any."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return time.thread_time, None
    try:
        running, runnable = os.pread(fd, 128, 0).split()[:2]
        int(running), int(runnable)
    except (OSError, ValueError):
        os.close(fd)
        return time.thread_time, None

    def busy() -> float:
        running, runnable = os.pread(fd, 128, 0).split()[:2]
        return (int(running) + int(runnable)) / 1e9

    return busy, fd


class LoopLoad:
    """Whether the event loop thread is saturated: the share of wall time it spent running or
    waiting for a CPU, sampled from the loop at most once per window (two clock reads a window,
    not per request). Made on the loop: the default clock is the calling thread's."""

    def __init__(self, busy: Callable[[], float] | None = None, wall: Callable[[], float] = time.perf_counter,
                 window_s: float = LOAD_WINDOW_S) -> None:
        if busy is None:
            busy, fd = _thread_busy_clock()
            if fd is not None:
                weakref.finalize(self, os.close, fd)
        self._busy, self._wall, self._window = busy, wall, window_s
        self._t0, self._b0 = wall(), busy()
        self.share = 0.0

    def saturated(self) -> bool:
        t = self._wall()
        if t - self._t0 >= self._window:
            b = self._busy()
            self.share = (b - self._b0) / (t - self._t0)
            self._t0, self._b0 = t, b
        return self.share >= SATURATED_SHARE


class Load(Protocol):
    def saturated(self) -> bool: ...


class WaitPolicy(Protocol):
    """What ``DynamicBatcher`` asks while nothing of the model runs. ``started`` is when the
    wait in progress began (None: none is)."""

    started: float | None

    def holds(self, now: float, cheap: bool) -> bool:
        """Whether the queue is held for company now; ``cheap``: the model's calls are cheap
        enough to run on the event loop."""
        ...

    def begin(self, now: float) -> None:
        """The queue is being held (a no-op while a wait is in progress)."""
        ...

    def judge(self, now: float, last_arrival: float) -> None:
        """The held batch leaves; ``last_arrival`` is when the model's latest request came."""
        ...

    def abandon(self) -> None:
        """The queue emptied during a wait (cancelled or expired requests): no verdict."""
        ...


class IdleWait:
    """The rule of the module docstring, for one model. ``load`` reads the loop's load; by
    default a ``LoopLoad`` made at the first question, which is asked on the loop."""

    def __init__(self, load: Load | None = None) -> None:
        self._load = load
        self.started: float | None = None
        self._pays = False
        self._probe_at = -math.inf
        self._backoff_s = PROBE_BACKOFF_S[0]

    @property
    def pays(self) -> bool:
        """Whether the last wait found company until near its end."""
        return self._pays

    def holds(self, now: float, cheap: bool) -> bool:
        if self.started is not None:
            return True  # a wait once begun runs to its end (delay, size or priority), so that it can be judged
        if not cheap:
            return False  # a model that computes on a thread is compute-bound: an idle instance starts at once
        if self._load is None:
            self._load = LoopLoad()
        if not self._load.saturated():
            return False
        return self._pays or now >= self._probe_at

    def begin(self, now: float) -> None:
        if self.started is None:
            self.started = now

    def judge(self, now: float, last_arrival: float) -> None:
        started, self.started = self.started, None
        if started is None:
            return  # no wait was in progress: nothing to judge
        if last_arrival >= started + _PAID_AFTER * (now - started):
            self._pays, self._backoff_s = True, PROBE_BACKOFF_S[0]
        else:
            self._pays = False
            self._probe_at = now + self._backoff_s
            self._backoff_s = min(2 * self._backoff_s, PROBE_BACKOFF_S[1])

    def abandon(self) -> None:
        self.started = None


__all__ = ["IdleWait", "Load", "LoopLoad", "WaitPolicy"]
