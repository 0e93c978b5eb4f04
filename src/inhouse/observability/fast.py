"""Counters and histograms for the request path, cheaper than prometheus_client's own: one
uncontended lock and a bisect per observation (prometheus_client takes a lock per bucket
and per sum and scans buckets linearly). They export through a ``Collector`` at scrape time,
in the same exposition format."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class HistogramChild:
    __slots__ = ("_bounds", "_counts", "_lock", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self._bounds, value)  # le semantics: value <= bound
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._counts), self._sum


class CounterChild:
    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._value = 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def get(self) -> float:
        return self._value


C = TypeVar("C", HistogramChild, CounterChild)


class _Family(Collector, Generic[C]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None, make: Callable[[], C]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        self._lock = threading.Lock()
        self._make: Callable[[], C] = make
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(tuple(values), self._make())
        return child

    def remove(self, *values: str) -> None:
        with self._lock:
            self._children.pop(tuple(values), None)

    def label_sets(self) -> list[tuple[str, ...]]:
        with self._lock:
            return list(self._children)


class FastHistogram(_Family[HistogramChild]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry | None = None) -> None:
        self._bounds = tuple(sorted(float(b) for b in buckets))
        super().__init__(name, documentation, labelnames, registry, lambda: HistogramChild(self._bounds))

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        edges = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        for values, child in children:
            counts, total = child.snapshot()
            cumulative, running = [], 0
            for edge, n in zip(edges, counts, strict=True):
                running += n
                cumulative.append((edge, running))
            fam.add_metric(list(values), cumulative, total)
        yield fam


class FastCounter(_Family[CounterChild]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None = None) -> None:
        super().__init__(name, documentation, labelnames, registry, CounterChild)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for values, child in children:
            fam.add_metric(list(values), child.get())
        yield fam
