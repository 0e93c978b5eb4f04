"""How requests reach a loaded model: ``DynamicBatcher`` admits them to a model's bounded
priority queue (or answers 429 with Retry-After), runs its N instance threads and dispatches
batches to them. The pieces it uses live beside it: batch assembly (``batching.py``), the
deadline heap (``deadlines.py``), whether a batch runs on the loop (``placement.py``) and whether
an idle model waits for company (``wait_policy.py``, injected).

The hot path is: ``submit`` queues the request and asks for a dispatch at the end of the
current event-loop iteration (so requests that arrive together leave together); a free
instance thread joins the batch, runs the model, splits the outputs and hands all results
back to the loop with one wake-up. Batches measured as cheaper than that hand-off run on the
loop itself."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inhouse.backends import LoadedModel
from inhouse.core.recorders import NULL_SCHEDULER_RECORDER, SchedulerRecorder
from inhouse.core.scheduling.batching import DONE, QUEUED, Batch, BatchQueue, Pending, TensorLayout
from inhouse.core.scheduling.deadlines import Deadlines
from inhouse.core.scheduling.placement import INLINE_BURST, runs_inline
from inhouse.core.scheduling.wait_policy import IdleWait, WaitPolicy
from inhouse.core.spec import ModelSpec
from inhouse.errors import (
    DatatypeError,
    DeadlineExceededError,
    InferenceError,
    InhouseError,
    InputNameError,
    InvalidRequestError,
    ModelNotReadyError,
    OutOfMemoryError,
    QueueFullError,
    ShapeError,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Result = dict[str, np.ndarray] | BaseException  # a request's outputs, or what it fails with
_INPUT_ERRORS = (DatatypeError, ShapeError, InputNameError, InvalidRequestError)
_NO_INPUTS: dict[str, np.ndarray] = {}
# a pool that may grow adds an instance once every instance has been busy with work waiting this long
GROW_AFTER_S = 0.1


class Scheduler(Protocol):
    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *,
                     priority: int | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        ...

    def queue_depth(self) -> int: ...

    async def close(self) -> None: ...


@dataclass
class SchedulerStats:
    """Counters for tests, metrics and the bench (requests counts one per submitted chunk)."""

    submitted: int = 0
    executed: int = 0
    batches: int = 0
    batched_rows: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    failed: int = 0
    inline_batches: int = 0


class _Instance:
    """One worker thread running batches on the model. Instances share the loaded model
    (onnxruntime sessions are safe to run from several threads)."""

    def __init__(self, index: int, name: str, run: Callable[[_Instance, Batch], None]) -> None:
        self.index = index
        self.busy = False
        self.batches = 0  # batches finished; the pool's shrink check compares it between its ticks
        self.seen = -1
        self._inbox: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._run = run
        self._thread = threading.Thread(target=self._loop, name=f"inhouse-{name}-{index}", daemon=True)
        self._thread.start()

    def send(self, batch: Batch | None) -> None:
        self._inbox.put(batch)

    def _loop(self) -> None:
        while True:
            batch = self._inbox.get()
            if batch is None:
                return
            self._run(self, batch)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class DynamicBatcher:
    """Per-model dynamic batcher with priorities, a bounded queue, deadlines and N instances.

    ``max_batch_size: 0`` turns batching off: every request is its own backend call, but the
    queue, priorities, deadlines and instances work the same. ``wait`` decides whether the model
    holds its queue for company while nothing of it runs; by default an ``IdleWait`` of its own
    (the rule keeps state per model)."""

    def __init__(self, model: LoadedModel, spec: ModelSpec, *, clock: Clock = time.monotonic,
                 recorder: SchedulerRecorder = NULL_SCHEDULER_RECORDER, wait: WaitPolicy | None = None) -> None:
        self._model = model
        self._spec = spec
        self._name = spec.name
        self._clock = clock
        self._cfg = spec.batching
        self._layout = TensorLayout(spec.name, model.inputs, model.outputs, self._cfg.max_batch_size > 0)
        self._queue = BatchQueue(self._cfg)
        self._default_timeout = self._cfg.default_timeout_ms / 1000 if self._cfg.default_timeout_ms else None
        self._default_priority = self._cfg.priority_levels - 1
        pool = spec.instances
        self._pool_min = pool.initial
        self._pool_max = max(self._pool_min, pool.maximum)
        self._idle_s = pool.idle_after_s
        self._instances = [_Instance(i, spec.name, self._execute) for i in range(self._pool_min)]
        self._next_index = self._pool_min
        # the free instances, a stack: the most recently used runs next, so surplus ones stay idle
        self._idle: list[_Instance] = list(self._instances)
        self._grows = self._pool_max > self._pool_min
        self._saturated_since: float | None = None
        self._grow_timer: asyncio.TimerHandle | None = None
        self._shrink_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._deadlines = Deadlines(clock, self._expire)
        self._running = 0
        # whether a model with nothing running holds its queue for company (wait_policy.py)
        self._wait_policy: WaitPolicy = wait if wait is not None else IdleWait()
        self._last_arrival = -math.inf
        self._seq = 0
        self._closed = False
        self._ema_batch_s = 0.001  # wall time per call: queue-wait estimates (Retry-After)
        self._ema_cpu_s = 0.001  # CPU time of the model call (calling thread): the inline decision
        self._ema_rows = 1.0
        # pure-Python backends may hold the GIL or block; only native engines run inline
        self._inline_ok = getattr(model, "inline_safe", False)
        # whether a lone call is cheap enough for the loop (only such models wait for company when
        # idle); not until calls are measured, kept with the averages in _finish
        self._cheap = False
        self.stats = SchedulerStats()
        self._recorder = recorder
        self._record = recorder is not NULL_SCHEDULER_RECORDER

    # ---- public ---------------------------------------------------------------------------
    def queue_depth(self) -> int:
        return len(self._queue)

    def predicted_wait_s(self) -> float:
        """How long a request queued now would wait: the queued batches over the instances, at the
        measured time per call (the estimate the 429's Retry-After uses)."""
        per_batch = max(1, self._cfg.max_batch_size)
        return len(self._queue) / per_batch * self._ema_batch_s / len(self._instances)

    @property
    def instance_count(self) -> int:
        """Instances running now (between instances.init_size and max_size)."""
        return len(self._instances)

    def set_recorder(self, recorder: SchedulerRecorder) -> None:
        """Metrics for this model version: queue time per request (in the request's context),
        compute time and size per batch."""
        self._recorder = recorder
        self._record = recorder is not NULL_SCHEDULER_RECORDER

    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *,
                     priority: int | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if self._closed:
            raise ModelNotReadyError(f"Model '{self._name}' is unloading; retry.")
        level = self._level(priority)
        rows, key = self._layout.rows_and_key(inputs, outputs)
        timeout = timeout_s if timeout_s is not None else self._default_timeout
        now = self._clock()
        deadline = now + timeout if timeout is not None else None
        max_rows = self._cfg.max_batch_size
        if max_rows and rows > max_rows:
            return await self._submit_chunked(inputs, outputs, rows, key, level, now, deadline, timeout)
        self._admit(1)
        p = Pending(inputs, outputs, rows, key, level, now, deadline)
        return await self._wait(self._enqueue(p), p, timeout)

    async def close(self) -> None:
        """Fail what is still queued, let running batches finish, stop the instance threads."""
        self._closed = True
        for handle in (self._timer, self._grow_timer, self._shrink_timer):
            if handle is not None:
                handle.cancel()
        self._deadlines.close()
        for p in self._queue.drain():
            self._fail(p, ModelNotReadyError(f"Model '{self._name}' was unloaded before the request ran; retry."))
        for inst in self._instances:
            inst.send(None)
        loop = asyncio.get_running_loop()
        for inst in self._instances:
            await loop.run_in_executor(None, inst.join, 30.0)

    # ---- admission --------------------------------------------------------------------------
    def _level(self, priority: int | None) -> int:
        """0 is served first. A priority beyond the model's levels counts as the lowest (the
        default), as Triton treats out-of-range priorities, so clients that always send one work
        with every model."""
        if priority is None:
            return self._default_priority
        if priority < 0:
            raise InvalidRequestError(f"Priority {priority} is negative; use 0 (first) to "
                                      f"{self._cfg.priority_levels - 1} for model '{self._name}'.")
        return min(priority, self._default_priority)

    def _admit(self, n: int) -> None:
        depth = len(self._queue)
        if depth + n > self._cfg.max_queue_size:
            self.stats.rejected += 1
            per_batch = max(1, self._cfg.max_batch_size)
            wait_s = depth / per_batch * self._ema_batch_s / len(self._instances)
            retry = max(1, math.ceil(wait_s))
            raise QueueFullError(
                f"Model '{self._name}' has {depth} requests queued, its limit (batching.max_queue_size "
                f"{self._cfg.max_queue_size}); retry after about {retry} s.",
                headers={"Retry-After": str(retry)},
            )

    def _enqueue(self, p: Pending) -> asyncio.Future[dict[str, np.ndarray]]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        p.future = fut
        self._seq += 1
        p.seq = self._seq
        self._last_arrival = p.enqueued
        if p.deadline is not None:
            self._deadlines.add(loop, p, p.deadline)
        if self._record:
            p.ctx = contextvars.copy_context()
        self._queue.push(p)
        self.stats.submitted += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def _wait(self, fut: asyncio.Future[dict[str, np.ndarray]], p: Pending,
                    budget_s: float | None) -> dict[str, np.ndarray]:
        try:
            return await fut
        except asyncio.CancelledError:
            # the caller went away (client disconnect): a queued request never runs
            if p.state == QUEUED:
                self._queue.discard(p)
                p.state = DONE
                p.inputs = _NO_INPUTS  # in no batch: the deadline heap need not keep its tensors
                self.stats.cancelled += 1
            raise
        except DeadlineExceededError:
            if budget_s is None:
                raise  # no deadline of ours: the model's own (an upstream that timed out) says why
            raise DeadlineExceededError(
                f"Request to model '{self._name}' exceeded its {budget_s * 1000:.0f} ms "
                "deadline; raise the request's 'timeout' parameter or batching.default_timeout_ms."
            ) from None

    async def _submit_chunked(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, rows: int,
                              key: object, level: int, now: float, deadline: float | None,
                              budget_s: float | None) -> dict[str, np.ndarray]:
        """A request larger than max_batch_size runs as chunks; outputs are joined in order."""
        size = self._cfg.max_batch_size
        starts = range(0, rows, size)
        self._admit(len(starts))
        chunks = [Pending({k: v[s:s + size] for k, v in inputs.items()}, outputs, min(size, rows - s), key,
                          level, now, deadline) for s in starts]
        futures = [self._enqueue(p) for p in chunks]
        waits = [asyncio.ensure_future(self._wait(f, p, budget_s)) for f, p in zip(futures, chunks, strict=True)]
        try:
            parts = await asyncio.gather(*waits)
        except BaseException:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            raise
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

    # ---- dispatch (event loop) -------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        inline_runs = 0
        wait = self._wait_policy
        while self._idle and not self._closed:
            now = self._clock()
            seeking = self._running == 0 and wait.holds(now, self._cheap)
            nxt = self._queue.next_batch(now, hold=self._running > 0 or seeking)
            if nxt is None:
                if wait.started is not None:
                    wait.abandon()
                if self._grows:
                    self._saturated_since = None
                return
            if isinstance(nxt, float):
                if seeking:
                    wait.begin(now)
                self._arm(nxt - now)
                if self._grows:
                    self._saturated_since = None
                return
            if wait.started is not None:
                wait.judge(now, self._last_arrival)
            for p in nxt.expired:
                self._expire(p)
            if not nxt.requests:
                continue
            if self._record:
                self._record_queue(nxt, now)
            if self._inline(nxt):
                # a call cheaper than two thread hand-offs runs right here on the event loop
                results, elapsed, cpu = self._compute(nxt)
                self._finish(nxt, results, elapsed, cpu)
                self.stats.inline_batches += 1
                inline_runs += 1
                if inline_runs >= INLINE_BURST and len(self._queue):
                    self._flush_scheduled = True  # let the loop breathe between bursts
                    if self._loop is not None:
                        self._loop.call_soon(self._flush)
                    return
                continue
            inst = self._idle.pop()
            inst.busy = True
            self._running += 1
            inst.send(nxt)
        if self._grows:
            if not len(self._queue):
                self._saturated_since = None
            elif self._saturated_since is None:
                self._saturated(self._clock())

    # ---- a pool that grows under load and shrinks when idle (instances.init_size / max_size) ----
    def _saturated(self, now: float) -> None:
        """Every instance is busy and work waits: grow if that lasts GROW_AFTER_S."""
        if len(self._instances) >= self._pool_max or self._loop is None:
            return
        self._saturated_since = now
        if self._grow_timer is None:
            self._grow_timer = self._loop.call_later(GROW_AFTER_S, self._grow_check)

    def _grow_check(self) -> None:
        self._grow_timer = None
        since = self._saturated_since
        if self._closed or since is None:
            return
        if self._idle or not len(self._queue):
            self._saturated_since = None
            return
        now = self._clock()
        if now - since < GROW_AFTER_S:  # saturated again after a pause: wait out the rest
            if self._loop is not None:
                self._grow_timer = self._loop.call_later(GROW_AFTER_S - (now - since), self._grow_check)
            return
        # instances share the loaded model, so a new one is a thread: nothing to load
        inst = _Instance(self._next_index, self._name, self._execute)
        self._next_index += 1
        self._instances.append(inst)
        self._idle.append(inst)
        self._saturated_since = None
        log.info("model pool grew", extra={"model": self._name, "instances": len(self._instances)})
        if self._shrink_timer is None and self._loop is not None:
            self._shrink_timer = self._loop.call_later(self._idle_s, self._shrink_check)
        self._flush()  # runs the waiting work, and notes saturation again if it remains

    def _shrink_check(self) -> None:
        """Every idle_s: stop one instance beyond init_size that ran nothing since the last check.
        The free list is a stack, so the least recently used instance is at its bottom."""
        self._shrink_timer = None
        if self._closed or len(self._instances) <= self._pool_min:
            return
        for inst in self._idle:
            if inst.seen == inst.batches:
                self._idle.remove(inst)
                self._instances.remove(inst)
                inst.send(None)
                log.info("model pool shrank", extra={"model": self._name, "instances": len(self._instances)})
                break
        for inst in self._instances:
            inst.seen = inst.batches
        if len(self._instances) > self._pool_min and self._loop is not None:
            self._shrink_timer = self._loop.call_later(self._idle_s, self._shrink_check)

    def _record_queue(self, batch: Batch, now: float) -> None:
        observe = self._recorder.observe_queue
        for p in batch.requests:
            if p.ctx is not None:
                p.ctx.run(observe, now - p.enqueued)
            else:
                observe(now - p.enqueued)

    def _inline(self, batch: Batch) -> bool:
        return self._inline_ok and self._running == 0 and runs_inline(
            self._ema_cpu_s, self._ema_rows, batch.rows)

    def _arm(self, delay_s: float) -> None:
        if self._loop is None:
            return
        at = self._loop.time() + max(0.0, delay_s)
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._flush()

    def _expire(self, p: Pending) -> None:
        """A deadline passed: a queued request is dropped (never runs); a running one is
        answered now and its result discarded when it arrives."""
        if p.future is None or p.future.done():
            # answered, or its caller cancelled it in this same loop turn (its task has not yet
            # run to leave the queue): still queued, it must leave the queue's count here
            self._queue.discard(p)
            p.state = DONE
            return
        if p.state == QUEUED:  # in no batch yet: dropped, and its tensors with it
            self._queue.discard(p)
            p.inputs = _NO_INPUTS
        p.state = DONE
        self.stats.expired += 1
        self._fail(p, DeadlineExceededError(f"Request to model '{self._name}' exceeded its deadline."))

    def _fail(self, p: Pending, err: BaseException) -> None:
        p.state = DONE
        if p.future is not None and not p.future.done():
            p.future.set_exception(err)

    # ---- the batch path (an instance thread, or the loop for cheap calls) ------------------
    def _execute(self, inst: _Instance, batch: Batch) -> None:
        results, elapsed, cpu = self._compute(batch)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._complete, inst, batch, results, elapsed, cpu)

    def _compute(self, batch: Batch) -> tuple[Sequence[Result], float, float]:
        """Results per request, the wall time of the whole batch, and the CPU time of the model
        call itself (the batch's wall time when the call failed). The inputs were decoded and
        checked against the model's tensors before they were queued."""
        requests = batch.requests
        start = time.perf_counter()
        cpu: float | None = None
        results: Sequence[Result]
        try:
            feed, lengths = self._layout.join(requests)  # batch: concatenate, padding where declared
            called = time.thread_time()  # CPU time is not inflated when the machine preempts us
            out = self._model.predict(feed, requests[0].outputs)
            cpu = time.thread_time() - called
            # unbatch; split checks the count: one output row per input row
            results = self._layout.split(requests, out, lengths)
        except Exception as exc:
            results = self._failed(requests, exc)
        elapsed = time.perf_counter() - start
        return results, elapsed, cpu if cpu is not None else elapsed

    def _failed(self, requests: list[Pending], exc: Exception) -> list[Result]:
        """What each request of a failed batch gets: a bad input among several is isolated by
        running each request alone; an unexpected error is logged and answered without its text."""
        if isinstance(exc, InhouseError):
            if len(requests) > 1 and isinstance(exc, _INPUT_ERRORS):
                return [self._run_alone(p) for p in requests]
            return [exc] * len(requests)
        if isinstance(exc, MemoryError):
            return [OutOfMemoryError(f"Out of memory running model '{self._name}'; lower "
                                     "batching.max_batch_size or send smaller requests.")] * len(requests)
        log.error("model call failed", exc_info=exc, extra={"model": self._name})
        return [InferenceError(f"Model '{self._name}' failed: {type(exc).__name__}.")] * len(requests)

    def _run_alone(self, p: Pending) -> Result:
        try:
            return self._model.predict(p.inputs, p.outputs)
        except BaseException as err:
            return err if isinstance(err, InhouseError) else InferenceError(
                f"Model '{self._name}' failed: {type(err).__name__}.")

    # ---- after a batch (event loop): measure, record, answer --------------------------------
    def _complete(self, inst: _Instance, batch: Batch, results: Sequence[Result], elapsed: float,
                  cpu: float) -> None:
        inst.busy = False
        inst.batches += 1
        self._idle.append(inst)
        self._running -= 1
        self._finish(batch, results, elapsed, cpu)
        self._flush()

    def _finish(self, batch: Batch, results: Sequence[Result], elapsed: float, cpu: float) -> None:
        self._ema_batch_s = 0.8 * self._ema_batch_s + 0.2 * elapsed
        self._ema_cpu_s = 0.8 * self._ema_cpu_s + 0.2 * cpu
        self._ema_rows = 0.8 * self._ema_rows + 0.2 * batch.rows
        self._cheap = self._inline_ok and runs_inline(self._ema_cpu_s, self._ema_rows, 1)
        if self._record:  # once per backend call, in the context of the batch's first request
            first = batch.requests[0].ctx if batch.requests else None
            if first is not None:
                first.run(self._recorder.observe_compute, elapsed, len(batch.requests))
            else:
                self._recorder.observe_compute(elapsed, len(batch.requests))
        st = self.stats
        st.batches += 1
        st.batched_rows += batch.rows
        st.executed += len(batch.requests)
        for p, res in zip(batch.requests, results, strict=True):
            p.state = DONE
            p.inputs = _NO_INPUTS  # the heap of deadlines may hold the entry a while: not its tensors
            fut = p.future
            p.future = None
            if fut is None or fut.done():
                continue
            if isinstance(res, BaseException):
                st.failed += 1
                fut.set_exception(res)
            else:
                fut.set_result(res)


__all__ = ["DynamicBatcher", "Scheduler", "SchedulerStats"]
