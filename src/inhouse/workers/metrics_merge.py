"""One ``/metrics`` for all workers: every worker's exposition, parsed and added up.

Counters and histograms are sums (requests served by any worker). Gauges are sums where each
worker holds its own share (in-flight requests, queue depth, process memory) and the largest
value where every worker reports the same thing (model states, GPU and system memory, uptime)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

_SAME_IN_EVERY_WORKER = ("gpu_", "inhouse_model_state", "inhouse_models", "inhouse_system_", "inhouse_uptime",
                         "inhouse_llm_kv_cache")
_EARLIEST = ("process_start_time_seconds",)


def _combine(family: str, kind: str, sample: str, a: float, b: float) -> float:
    if sample.endswith("_created") or family.startswith(_EARLIEST):
        return min(a, b)
    if kind == "gauge" and family.startswith(_SAME_IN_EVERY_WORKER):
        return max(a, b)
    return a + b


def merge(texts: Iterable[str]) -> list[Metric]:
    """The families of several OpenMetrics expositions (``exposition``), samples with the same name and
    labels combined; a ``inhouse_workers`` gauge says how many expositions were merged."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    count = 0
    for text in texts:
        count += 1
        for fam in text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            table = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(s.labels.items()))  # every worker writes labels in one order
                old = table.get(key)
                table[key] = s.value if old is None else _combine(fam.name, fam.type, s.name, old, s.value)
    out: list[Metric] = []
    for name, fam in families.items():
        fam.samples = [Sample(sname, dict(labels), value) for (sname, labels), value in values[name].items()]
        out.append(fam)
    workers = Metric("inhouse_workers", "Worker processes whose metrics this scrape adds up.", "gauge")
    workers.samples = [Sample("inhouse_workers", {}, float(count))]
    out.append(workers)
    return out


def exposition(registry: CollectorRegistry) -> str:
    """A worker's own metrics as it hands them over: OpenMetrics, which keeps ``_created`` and
    the counters' ``_total`` inside their families."""
    text: bytes = generate_latest(registry)  # type: ignore[no-untyped-call]
    return text.decode()


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_merged(families: list[Metric], accept: str | None) -> tuple[bytes, str]:
    """Merged families (``merge``) in the format the scraper asked for (Prometheus text or OpenMetrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
