"""How requests reach a loaded model. ``DirectScheduler`` runs each request as its own
backend call on the model's instance threads, with a bounded queue and deadlines."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from inhouse.backends import LoadedModel
from inhouse.core.recorders import NULL_SCHEDULER_RECORDER, SchedulerRecorder
from inhouse.core.spec import ModelSpec
from inhouse.errors import DeadlineExceededError, QueueFullError

Clock = Callable[[], float]


class Scheduler(Protocol):
    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *,
                     priority: int | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        ...

    def queue_depth(self) -> int: ...

    async def close(self) -> None: ...


class DirectScheduler:
    """One backend call per request, at most ``instances.count`` at a time."""

    def __init__(self, model: LoadedModel, spec: ModelSpec, *, clock: Clock = time.monotonic,
                 recorder: SchedulerRecorder = NULL_SCHEDULER_RECORDER) -> None:
        self._model = model
        self._recorder = recorder
        self._spec = spec
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=spec.instances.count,
                                            thread_name_prefix=f"inhouse-{spec.name}")
        self._pending = 0
        self._max_pending = spec.batching.max_queue_size + spec.instances.count
        default = spec.batching.default_timeout_ms
        self._default_timeout = default / 1000 if default else None
        self._ema_s = 0.001

    def queue_depth(self) -> int:
        return self._pending

    def set_recorder(self, recorder: SchedulerRecorder) -> None:
        """Metrics for this model version: queue and compute time, batch sizes."""
        self._recorder = recorder

    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *,
                     priority: int | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if self._pending >= self._max_pending:
            retry = max(1, round(self._pending * self._ema_s / self._spec.instances.count))
            raise QueueFullError(
                f"Model '{self._spec.name}' has {self._pending} requests waiting, its queue limit "
                f"(batching.max_queue_size); retry after about {retry} s.",
                headers={"Retry-After": str(retry)},
            )
        timeout = timeout_s if timeout_s is not None else self._default_timeout
        deadline = self._clock() + timeout if timeout is not None else None
        self._pending += 1
        loop = asyncio.get_running_loop()
        try:
            # run in the request's context, so recorders can attribute queue / compute time to it
            fut = loop.run_in_executor(self._executor, contextvars.copy_context().run, self._run, inputs,
                                       outputs, deadline, self._clock())
            if deadline is None:
                return await fut
            try:
                return await asyncio.wait_for(asyncio.shield(fut), max(0.0, deadline - self._clock()))
            except TimeoutError:
                raise DeadlineExceededError(
                    f"Request to model '{self._spec.name}' exceeded its {timeout * 1000:.0f} ms "
                    "deadline; raise the request 'timeout' or batching.default_timeout_ms."
                ) from None
        finally:
            self._pending -= 1

    def _run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None,
             deadline: float | None, submitted: float) -> dict[str, np.ndarray]:
        start = self._clock()
        self._recorder.observe_queue(start - submitted)
        if deadline is not None and start > deadline:
            raise DeadlineExceededError(
                f"Request to model '{self._spec.name}' waited past its deadline and was not run."
            )
        result = self._model.predict(inputs, outputs)
        took = self._clock() - start
        self._recorder.observe_compute(took, 1)
        self._ema_s = 0.9 * self._ema_s + 0.1 * took
        return result

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
