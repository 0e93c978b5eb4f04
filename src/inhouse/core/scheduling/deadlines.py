"""Deadlines of a model's queued and running requests: one heap and one event-loop timer for
the earliest, instead of a timer armed and cancelled per request."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Iterator

from inhouse.core.scheduling.batching import DONE, Pending


class Deadlines:
    """Calls ``expire`` for every request whose deadline passes before it is done (or, running,
    before its answer is delivered). Finished entries are dropped when they reach the top."""

    def __init__(self, clock: Callable[[], float], expire: Callable[[Pending], None]) -> None:
        self._clock = clock
        self._expire = expire
        self._heap: list[tuple[float, int, Pending]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf
        self._closed = False

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[tuple[float, int, Pending]]:
        return iter(self._heap)

    def add(self, loop: asyncio.AbstractEventLoop, p: Pending, deadline: float) -> None:
        heap = self._heap
        # requests mostly finish in the order they came: drop the finished ones at the top as we
        # go, so the heap holds about the live requests instead of every request of the last
        # timeout (popping those in one go stalled the loop for milliseconds)
        while heap and heap[0][2].state == DONE:
            heapq.heappop(heap)
        heapq.heappush(heap, (deadline, p.seq, p))
        if deadline < self._at:
            self._loop = loop
            self._arm(loop, deadline)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float, min_delay: float = 0.0) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = deadline
        delay = max(min_delay, deadline - self._clock())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        """Expire every request whose deadline has passed; re-arm for the next one pending."""
        self._timer = None
        self._at = math.inf
        heap = self._heap
        now = self._clock()
        while heap:
            deadline, _, p = heap[0]
            if p.state != DONE and deadline > now:
                break
            heapq.heappop(heap)
            if p.state != DONE or (p.future is not None and not p.future.done()):
                self._expire(p)
        if heap and self._loop is not None and not self._closed:
            self._arm(self._loop, heap[0][0], 1e-3)  # a clock that lags the loop's cannot spin it


__all__ = ["Deadlines"]
