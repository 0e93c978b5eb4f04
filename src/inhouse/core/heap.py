"""Keeping Python's garbage collector off the request path.

A loaded server holds some 100,000 long-lived objects (modules, onnxruntime and numpy
wrappers, specs, metrics). Under load the short-lived objects of in-flight requests keep
getting promoted to the oldest generation, and every few hundred milliseconds CPython runs a
full collection that walks all of those long-lived objects: 50-80 ms with the event loop
stopped, and ~13 % of the server's CPU at 20,000 requests/s (measured in ``bench/README.md``).

``gc.freeze()`` moves every object alive at that moment into a permanent generation that
collections skip. The settler does ``unfreeze → collect → freeze`` when the server becomes
ready and again, debounced, after models are loaded or unloaded, so a model's objects are
frozen while it serves and become collectable again (cycles included) once it is gone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from inhouse.core.manager import ModelState

log = logging.getLogger(__name__)


def settle() -> float:
    """Collect what is garbage now, then freeze everything alive; returns the seconds taken."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


class HeapSettler:
    """A model-manager listener that settles the heap ``delay_s`` after the last load or unload."""

    def __init__(self, delay_s: float = 1.0) -> None:
        self.delay_s = delay_s
        self._timer: asyncio.TimerHandle | None = None
        self.settled = 0

    def settle_now(self) -> None:
        self.close()
        took = settle()
        self.settled += 1
        log.debug("heap settled", extra={"frozen_objects": gc.get_freeze_count(), "ms": round(took * 1000, 1)})

    def __call__(self, name: str, version: int | None, state: ModelState) -> None:
        if state not in (ModelState.READY, ModelState.UNLOADED):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.close()
        self._timer = loop.call_later(self.delay_s, self.settle_now)

    def close(self) -> None:
        """Forget a pending settle."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["HeapSettler", "settle"]
