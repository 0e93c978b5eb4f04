"""Batch assembly, independent of threads and event loops: the priority queue of waiting
requests, the rule that decides when a batch leaves, and the tensor work of joining requests
into one batch (with padding) and splitting the model's outputs back. Time is passed in, so
tests drive it with a fake clock."""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inhouse.core.spec import BatchingSpec, TensorSpec
from inhouse.errors import InferenceError, ModelSpecError, ShapeError

# Request life cycle inside the scheduler.
QUEUED, RUNNING, DONE = 0, 1, 2


@dataclass(slots=True, eq=False)
class Pending:
    """One request (or one chunk of a large request) waiting for, or in, a batch."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int
    key: Hashable
    priority: int
    enqueued: float
    deadline: float | None
    future: asyncio.Future[dict[str, np.ndarray]] | None = None
    state: int = QUEUED
    seq: int = 0
    ctx: contextvars.Context | None = None  # the request's context, for metrics recorders


@dataclass(slots=True)
class Batch:
    requests: list[Pending]
    rows: int
    expired: list[Pending] = field(default_factory=list)


class TensorLayout:
    """How a model's tensors batch: which inputs pad along which dimensions, and how to tell
    whether two requests may share a batch."""

    def __init__(self, model_name: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 batching: bool) -> None:
        self.model = model_name
        self.batching = batching
        # input name → dimensions (>= 1) it may be padded along, and the pad value
        self.pad: dict[str, tuple[tuple[int, ...], Any]] = {}
        for t in inputs:
            if t.pad_value is not None and t.dtype != "BYTES":
                dims = tuple(i for i, d in enumerate(t.shape) if i >= 1 and d == -1)
                if dims:
                    self.pad[t.name] = (dims, t.pad_value)
        self.output_dynamic: dict[str, tuple[int, ...] | None] = {
            o.name: (tuple(i for i, d in enumerate(o.shape) if i >= 1 and d == -1) if o.shape else None)
            for o in outputs
        }
        if batching:
            for kind, tensors in (("input", inputs), ("output", outputs)):
                for t in tensors:
                    if (kind == "input" and not t.shape) or (t.shape and t.shape[0] != -1):
                        raise ModelSpecError(
                            f"Model '{model_name}' enables batching (batching.max_batch_size > 0) but its "
                            f"{kind} '{t.name}' has shape {t.shape}; batching needs a dynamic first "
                            "dimension (-1) on every input and output. Set max_batch_size: 0 or "
                            "re-export the model with a dynamic batch axis."
                        )

    def rows_and_key(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> tuple[int, Hashable]:
        """The request's batch size and its compatibility key: requests with equal keys can be
        concatenated (after padding the paddable dimensions)."""
        rows = -1
        parts: list[Hashable] = [tuple(outputs) if outputs is not None else None]
        for name in sorted(inputs):
            arr = inputs[name]
            if not self.batching:
                continue
            if arr.ndim == 0:
                raise ShapeError(f"Input '{name}' of model '{self.model}' is a scalar; batching needs a "
                                 "batch dimension.")
            if rows == -1:
                rows = arr.shape[0]
            elif arr.shape[0] != rows:
                raise ShapeError(
                    f"Inputs of model '{self.model}' disagree on the batch size (first dimension): "
                    f"'{name}' has {arr.shape[0]}, another input has {rows}."
                )
            pad = self.pad.get(name)
            shape = arr.shape[1:]
            if pad is not None:
                shape = tuple(None if (i + 1) in pad[0] else d for i, d in enumerate(shape))
            parts.append((name, arr.dtype.str, shape))
        return max(rows, 1) if not self.batching else rows, tuple(parts)

    # ---- join and split (run on instance threads) ----------------------------------------
    def join(self, requests: list[Pending]) -> tuple[dict[str, np.ndarray], dict[int, list[tuple[int, ...]]]]:
        """The batched feed, and for every padded length the original lengths per request (to
        slice outputs back)."""
        first = requests[0]
        if len(requests) == 1:
            return first.inputs, {}
        feed: dict[str, np.ndarray] = {}
        lengths: dict[int, list[tuple[int, ...]]] = {}
        for name, arr0 in first.inputs.items():
            arrays = [r.inputs[name] for r in requests]
            pad = self.pad.get(name)
            if pad is not None:
                target = list(arr0.shape)
                for d in pad[0]:
                    target[d] = max(a.shape[d] for a in arrays)
                if any(a.shape[1:] != tuple(target[1:]) for a in arrays):
                    feed[name] = _pad_concat(arrays, target, pad[1], arr0.dtype)
                    for d in pad[0]:
                        lengths.setdefault(target[d], [(a.shape[d],) for a in arrays])
                    continue
            feed[name] = np.concatenate(arrays, axis=0)
        return feed, lengths

    def split(self, requests: list[Pending], results: dict[str, np.ndarray],
              lengths: dict[int, list[tuple[int, ...]]]) -> list[dict[str, np.ndarray]]:
        if len(requests) == 1:
            return [results]
        total = sum(r.rows for r in requests)
        out: list[dict[str, np.ndarray]] = [{} for _ in requests]
        for name, arr in results.items():
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != total:
                raise InferenceError(
                    f"Model '{self.model}' returned output '{name}' with shape {list(arr.shape)} for a "
                    f"batch of {total} rows; a batched model must return one row per input row. "
                    "Disable batching for this model (batching.max_batch_size: 0)."
                )
            slice_dims = self._slice_dims(name, arr, lengths)
            start = 0
            for i, r in enumerate(requests):
                part = arr[start:start + r.rows]
                if slice_dims:
                    idx: list[slice] = [slice(None)] * arr.ndim
                    for d, L in slice_dims:
                        idx[d] = slice(0, lengths[L][i][0])
                    part = part[tuple(idx)]
                out[i][name] = part
                start += r.rows
        return out

    def _slice_dims(self, name: str, arr: np.ndarray,
                    lengths: dict[int, list[tuple[int, ...]]]) -> list[tuple[int, int]]:
        if not lengths:
            return []
        dyn = self.output_dynamic.get(name)
        dims = dyn if dyn is not None else tuple(range(1, arr.ndim))
        return [(d, arr.shape[d]) for d in dims if d < arr.ndim and arr.shape[d] in lengths]


def _pad_concat(arrays: list[np.ndarray], target: list[int], value: Any, dtype: np.dtype[Any]) -> np.ndarray:
    total = sum(a.shape[0] for a in arrays)
    out = np.full([total, *target[1:]], value, dtype=dtype)
    start = 0
    for a in arrays:
        out[(slice(start, start + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
        start += a.shape[0]
    return out


class BatchQueue:
    """Waiting requests by priority level (0 first), FIFO within a level, and the rule that
    decides when a batch leaves:

    * a batch is full (``max_batch_size`` rows) or reaches a preferred size → leave now;
    * it holds a request of the top level and there are several levels → leave now;
    * otherwise wait for company up to ``max_queue_delay_ms`` after the oldest request, but only
      while ``hold`` says other work is running; a lone request on an idle model leaves at once.
    """

    def __init__(self, spec: BatchingSpec, *, scan_limit: int = 0) -> None:
        self.max_rows = spec.max_batch_size
        self.preferred = sorted(set(spec.preferred_batch_sizes))
        self.delay = spec.max_queue_delay_ms / 1000.0
        self.levels = spec.priority_levels
        self._queues: list[deque[Pending]] = [deque() for _ in range(self.levels)]
        self._size = 0
        self._scan_limit = scan_limit or max(64, 4 * self.max_rows)
        self._trigger = self.preferred[-1] if self.preferred else self.max_rows

    def __len__(self) -> int:
        return self._size

    def push(self, p: Pending) -> None:
        self._queues[p.priority].append(p)
        self._size += 1

    def discard(self, p: Pending) -> None:
        """Forget a queued request (cancelled or expired); it is skipped when met."""
        if p.state == QUEUED:
            p.state = DONE
            self._size -= 1

    def _live(self) -> Iterator[deque[Pending]]:
        for q in self._queues:
            while q and q[0].state != QUEUED:
                q.popleft()
            if q:
                yield q

    def head(self) -> Pending | None:
        for q in self._live():
            return q[0]
        return None

    def next_batch(self, now: float, hold: bool) -> Batch | float | None:
        """A batch to run now, or the time at which to ask again, or None when empty."""
        head = self.head()
        if head is None:
            return None
        if self.max_rows == 0:  # batching off: one request per call, by priority
            return self._take([head], head.rows)
        chosen: list[Pending] = []
        expired: list[Pending] = []
        rows = 0
        scanned = 0
        for q in self._queues:
            for p in q:
                if p.state != QUEUED:
                    continue
                scanned += 1
                if p.deadline is not None and p.deadline <= now:
                    expired.append(p)
                    continue
                if p.key == head.key and rows + p.rows <= self.max_rows:
                    chosen.append(p)
                    rows += p.rows
                if rows >= self.max_rows or scanned >= self._scan_limit:
                    break
            if rows >= self.max_rows or scanned >= self._scan_limit:
                break
        if not chosen:
            if expired:
                return self._take([], 0, expired)
            return self._take([head], head.rows)  # a chunk larger than max rows never happens
        leave = (
            rows >= self._trigger
            or rows in self.preferred
            or (self.levels > 1 and chosen[0].priority == 0)
            or not hold
            or now >= chosen[0].enqueued + self.delay
        )
        if leave:
            return self._take(chosen, rows, expired)
        if expired:
            return self._take([], 0, expired)
        return chosen[0].enqueued + self.delay

    def _take(self, chosen: list[Pending], rows: int, expired: list[Pending] | None = None) -> Batch:
        for p in chosen:
            p.state = RUNNING
        for p in expired or ():
            p.state = DONE
        self._size -= len(chosen) + len(expired or ())
        return Batch(chosen, rows, expired or [])

    def drain(self) -> list[Pending]:
        """Every queued request, removed (used on close)."""
        out = [p for q in self._queues for p in q if p.state == QUEUED]
        for q in self._queues:
            q.clear()
        for p in out:
            p.state = DONE
        self._size = 0
        return out
