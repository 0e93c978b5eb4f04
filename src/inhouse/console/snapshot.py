"""A compact JSON view of the server's own metrics registry, for the console's live charts.

Counters and histograms are cumulative, as Prometheus exports them; the console turns two
snapshots into rates and percentiles over the interval between them."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

CONSOLE_ROUTES = "/console"


class _Histogram:
    """One histogram summed over its label sets (models, versions, routes)."""

    def __init__(self) -> None:
        self.buckets: dict[float, float] = defaultdict(float)
        self.count = 0.0
        self.sum = 0.0

    def add(self, metric: Metric) -> None:
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                self.buckets[float(s.labels["le"])] += s.value
            elif s.name.endswith("_count"):
                self.count += s.value
            elif s.name.endswith("_sum"):
                self.sum += s.value

    def doc(self) -> dict[str, Any]:
        # JSON has no infinity: the last bucket is written as null
        return {"buckets": [[None if math.isinf(le) else le, n] for le, n in sorted(self.buckets.items())],
                "count": self.count, "sum": self.sum}


def _total(metric: Metric | None) -> float:
    if metric is None:
        return 0.0
    return sum(s.value for s in metric.samples if not s.name.endswith("_created"))


def _by(metric: Metric | None, label: str, suffix: str = "_total") -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    if metric is not None:
        for s in metric.samples:
            if s.name.endswith(suffix):
                out[s.labels.get(label, "")] += s.value
    return dict(out)


def _histogram(metric: Metric | None) -> dict[str, Any]:
    h = _Histogram()
    if metric is not None:
        h.add(metric)
    return h.doc()


def snapshot(metrics: Iterable[Metric], clock: Any = time.time) -> dict[str, Any]:
    """Totals since start-up of the numbers the console charts (``metrics``: a registry's
    families, or every worker's added up). HTTP requests leave out the console's own routes, so
    that its polling does not show as traffic."""
    families: dict[str, Metric] = {m.name: m for m in metrics}
    get = families.get
    inference = get("inhouse_inference_requests")
    errors: dict[str, float] = defaultdict(float)
    if inference is not None:
        for s in inference.samples:
            if s.name.endswith("_total") and s.labels.get("outcome") != "success":
                errors[s.labels.get("code", "")] += s.value
    http = _without_console(get("inhouse_http_requests"))
    return {
        "time": clock(),
        "http": {"requests": _total(http), "by_status": _by(http, "status")},
        "inference": {"requests": _total(inference), "errors_by_code": dict(errors),
                      "by_model": _by(inference, "model")},
        "latency": _histogram(get("model_inference_latency_seconds")),
        "http_latency": _histogram(_without_console(get("inhouse_http_request_duration_seconds"))),
        "batch_size": _histogram(get("inhouse_batch_size")),
        "queue_depth": _total(get("inhouse_queue_depth")),
        "inflight": _total(get("inhouse_inflight_requests")),
        "llm": {"prompt_tokens": _total(get("inhouse_llm_prompt_tokens")),
                "completion_tokens": _total(get("inhouse_llm_completion_tokens")),
                "ttft": _histogram(get("inhouse_llm_time_to_first_token_seconds"))},
        "process": {"cpu_seconds": _total(get("process_cpu_seconds")),
                    "resident_memory_bytes": _total(get("process_resident_memory_bytes")),
                    "system_memory_total_bytes": _total(get("inhouse_system_memory_total_bytes")),
                    "system_memory_available_bytes": _total(get("inhouse_system_memory_available_bytes"))},
    }


def _without_console(metric: Metric | None) -> Metric | None:
    if metric is None:
        return None
    kept = Metric(metric.name, metric.documentation, metric.type)
    kept.samples = [s for s in metric.samples if not s.labels.get("route", "").startswith(CONSOLE_ROUTES)]
    return kept
