"""Per-model-version inference statistics in the layout of the KServe / Triton statistics extension
(``GET /v2/models/{m}/stats``, gRPC ``ModelStatistics``), so ``tritonclient``'s
``get_inference_statistics`` and tools built on it work unchanged.

Fed by the same hooks as the Prometheus metrics (one request done or failed; one request's queue
wait; one backend call and its batch size): a few integer additions under a lock per request.
Durations are cumulative nanoseconds, as Triton reports them. inhouse does not time input and output
conversion apart from the backend call: the whole call is ``compute_infer``, and ``compute_input`` /
``compute_output`` carry the same counts with zero time, because clients such as ``perf_analyzer``
refuse statistics whose three compute counts differ. ``cache_hit`` / ``cache_miss`` count the
response cache's lookups of this version and the time they took (Triton's: a miss is then
computed and counted under compute too)."""

from __future__ import annotations

import threading
import time
from typing import Any

_NS = 1_000_000_000


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class VersionStatistics:
    __slots__ = (
        "_batches",
        "_lock",
        "cache_hit_n",
        "cache_hit_ns",
        "cache_miss_n",
        "cache_miss_ns",
        "execution_count",
        "fail_n",
        "fail_ns",
        "infer_n",
        "infer_ns",
        "inference_count",
        "last_inference_ms",
        "queue_n",
        "queue_ns",
        "success_n",
        "success_ns",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.success_n = self.success_ns = self.fail_n = self.fail_ns = 0
        self.queue_n = self.queue_ns = self.infer_n = self.infer_ns = 0
        self.inference_count = self.execution_count = self.last_inference_ms = 0
        self.cache_hit_n = self.cache_hit_ns = self.cache_miss_n = self.cache_miss_ns = 0
        self._batches: dict[int, list[int]] = {}  # batch size → [backend calls, ns]

    def done(self, seconds: float) -> None:
        ns = int(seconds * _NS)
        with self._lock:
            self.success_n += 1
            self.success_ns += ns
            self.last_inference_ms = time.time_ns() // 1_000_000

    def failed(self, seconds: float) -> None:
        ns = int(seconds * _NS)
        with self._lock:
            self.fail_n += 1
            self.fail_ns += ns

    def queued(self, seconds: float) -> None:
        ns = int(seconds * _NS)
        with self._lock:
            self.queue_n += 1
            self.queue_ns += ns

    def cache(self, hit: bool, seconds: float) -> None:
        ns = int(seconds * _NS)
        with self._lock:
            if hit:
                self.cache_hit_n += 1
                self.cache_hit_ns += ns
            else:
                self.cache_miss_n += 1
                self.cache_miss_ns += ns

    def computed(self, seconds: float, batch_size: int) -> None:
        ns = int(seconds * _NS)
        with self._lock:
            self.infer_n += batch_size
            self.infer_ns += ns * batch_size
            self.inference_count += batch_size
            self.execution_count += 1
            b = self._batches.get(batch_size)
            if b is None:
                self._batches[batch_size] = [1, ns]
            else:
                b[0] += 1
                b[1] += ns

    def snapshot(self, model: str, version: int) -> dict[str, Any]:
        with self._lock:
            return {
                "name": model, "version": str(version), "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {
                    "success": _duration(self.success_n, self.success_ns),
                    "fail": _duration(self.fail_n, self.fail_ns),
                    "queue": _duration(self.queue_n, self.queue_ns),
                    "compute_input": _duration(self.infer_n, 0),
                    "compute_infer": _duration(self.infer_n, self.infer_ns),
                    "compute_output": _duration(self.infer_n, 0),
                    "cache_hit": _duration(self.cache_hit_n, self.cache_hit_ns),
                    "cache_miss": _duration(self.cache_miss_n, self.cache_miss_ns),
                },
                "batch_stats": [
                    {"batch_size": size, "compute_input": _duration(n, 0), "compute_infer": _duration(n, ns),
                     "compute_output": _duration(n, 0)}
                    for size, (n, ns) in sorted(self._batches.items())
                ],
            }


class Statistics:
    """Every loaded version's statistics; a version's numbers go when it is retired."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, int], VersionStatistics] = {}

    def version(self, model: str, version: int) -> VersionStatistics:
        vs = self._versions.get((model, version))
        if vs is None:
            vs = self._versions.setdefault((model, version), VersionStatistics())
        return vs

    def known(self, model: str, version: int) -> VersionStatistics | None:
        return self._versions.get((model, version))

    def forget(self, model: str, version: int) -> None:
        self._versions.pop((model, version), None)

    def snapshot(self, versions: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Triton's ``model_stats`` list for these (model, version) pairs; a version that has served
        nothing yet reports zeros."""
        out = []
        for model, version in versions:
            vs = self._versions.get((model, version)) or VersionStatistics()
            out.append(vs.snapshot(model, version))
        return out
