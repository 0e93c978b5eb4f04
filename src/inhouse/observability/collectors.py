"""Collectors read at scrape time, so the request path never updates them: model states,
queue depth and in-flight requests, process CPU / memory (psutil) and NVIDIA GPUs (NVML)."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from inhouse.core.manager import ModelManager, ModelState
from inhouse.core.scheduling import DynamicBatcher

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")  # ':' and the rest a Prometheus name outside a recording rule avoids


class ModelCollector(Collector):
    """Per model version: state, queue depth and in-flight requests."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = GaugeMetricFamily("inhouse_model_state", "1 for the state each model version is in.",
                                  labels=["model", "version", "state"])
        count = GaugeMetricFamily("inhouse_models", "Model versions by state.", labels=["state"])
        depth = GaugeMetricFamily("inhouse_queue_depth", "Requests waiting for or running on a model.",
                                  labels=["model", "version"])
        inflight = GaugeMetricFamily("inhouse_inflight_requests", "Requests inside the data plane per model.",
                                     labels=["model", "version"])
        capacity = GaugeMetricFamily("inhouse_queue_capacity", "Queue limit (batching.max_queue_size).",
                                     labels=["model", "version"])
        instances = GaugeMetricFamily("inhouse_model_instances", "Instances running a model version (a pool "
                                      "with instances.max_size grows under load).", labels=["model", "version"])
        totals = dict.fromkeys(ModelState, 0)
        try:
            entries = self._manager.index()
        except Exception:  # an unreadable repository must not break the scrape
            log.exception("reading the model index for metrics failed")
            entries = []
        for e in entries:
            version = "" if e.version is None else str(e.version)
            s = ModelState(e.state)
            totals[s] += 1
            for candidate in ModelState:
                state.add_metric([e.name, version, candidate.value], 1.0 if candidate == s else 0.0)
        for name, versions in self._manager.serving().items():
            for mv in versions:
                sched = mv.scheduler
                depth.add_metric([name, str(mv.version)], float(sched.queue_depth() if sched else 0))
                inflight.add_metric([name, str(mv.version)], float(mv.inflight))
                capacity.add_metric([name, str(mv.version)], float(mv.spec.batching.max_queue_size))
                if isinstance(sched, DynamicBatcher):
                    instances.add_metric([name, str(mv.version)], float(sched.instance_count))
        for s, n in totals.items():
            count.add_metric([s.value], float(n))
        yield from (state, count, depth, inflight, capacity, instances)


class EngineCollector(Collector):
    """The own metrics of engines that run as server children (llama-server, vLLM), re-exported
    under inhouse's names with the model and version labels: ``llamacpp:requests_deferred`` →
    ``inhouse_llamacpp_requests_deferred``, ``vllm:num_requests_waiting`` →
    ``inhouse_vllm_num_requests_waiting``. Only a child's namespaced (``engine:``) families
    come over; its process and runtime metrics would clash with inhouse's own. The text is the
    engine's last read, parsed there (``RelayEngine.engine_metrics``): a scrape never waits on
    a child."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def describe(self) -> list[Metric]:
        return []  # the families depend on the engines loaded at scrape time

    def collect(self) -> Iterator[Metric]:
        out: dict[str, Metric] = {}
        for name, versions in self._manager.serving().items():
            for mv in versions:
                read = getattr(getattr(mv.model, "engine", None), "engine_metrics", None)
                families: list[Metric] = read() if callable(read) else []
                for fam in families:
                    if ":" not in fam.name:
                        continue
                    renamed = "inhouse_" + _UNSAFE.sub("_", fam.name)
                    metric = out.get(renamed)
                    if metric is None:
                        metric = out[renamed] = Metric(renamed, fam.documentation, fam.type)
                    for sample in fam.samples:
                        labels = {("engine_" + k if k in ("model", "version") else k): v
                                  for k, v in sample.labels.items()}
                        metric.add_sample(renamed + sample.name[len(fam.name):],
                                          {"model": name, "version": str(mv.version), **labels}, sample.value)
        yield from out.values()


class ProcessCollector(Collector):
    """The standard ``process_*`` metrics on every platform (psutil), plus machine memory for
    memory-pressure alerts."""

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        self._lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock, self._proc.oneshot():
            cpu = self._proc.cpu_times()
            mem = self._proc.memory_info()
            threads = self._proc.num_threads()
            fds = self._proc.num_fds() if hasattr(self._proc, "num_fds") else None
            started = self._proc.create_time()
        yield CounterMetricFamily("process_cpu_seconds", "User and system CPU time.", value=cpu.user + cpu.system)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory.", value=mem.rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory.", value=mem.vms)
        yield GaugeMetricFamily("process_start_time_seconds", "Start time, Unix seconds.", value=started)
        yield GaugeMetricFamily("process_threads", "OS threads.", value=threads)
        if fds is not None:
            yield GaugeMetricFamily("process_open_fds", "Open file descriptors.", value=fds)
        vm = psutil.virtual_memory()
        yield GaugeMetricFamily("inhouse_system_memory_total_bytes", "Physical memory of the machine.",
                                value=vm.total)
        yield GaugeMetricFamily("inhouse_system_memory_available_bytes",
                                "Memory available to new allocations without swapping.", value=vm.available)
        yield GaugeMetricFamily("inhouse_uptime_seconds", "Seconds since the process started.",
                                value=max(0.0, time.time() - started))


GPU_METRICS = ("gpu_memory_usage_bytes", "gpu_memory_total_bytes", "gpu_utilization_ratio")


class GpuCollector(Collector):
    """NVIDIA GPU utilisation and memory via NVML (``pip install 'inhouse[gpu]'``). Exports
    nothing where there is no driver or no GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[str, str, Any]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                self._handles.append((str(i), name.decode() if isinstance(name, bytes) else str(name), h))
            self._nvml = pynvml
        except Exception as err:  # no module, no driver, no GPU: no GPU metrics
            log.debug("GPU metrics off", extra={"reason": str(err)})

    @property
    def gpus(self) -> int:
        return len(self._handles)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families this collector exports when a GPU is present (for docs and tests)."""
        for name in GPU_METRICS:
            yield GaugeMetricFamily(name, name, labels=["gpu", "name"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None or not self._handles:
            return
        nv = self._nvml
        used = GaugeMetricFamily("gpu_memory_usage_bytes", "GPU memory in use.", labels=["gpu", "name"])
        total = GaugeMetricFamily("gpu_memory_total_bytes", "GPU memory.", labels=["gpu", "name"])
        util = GaugeMetricFamily("gpu_utilization_ratio", "Fraction of time a GPU kernel was running.",
                                 labels=["gpu", "name"])
        for idx, name, h in self._handles:
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                rates = nv.nvmlDeviceGetUtilizationRates(h)
            except Exception as err:
                log.warning("reading GPU metrics failed", extra={"gpu": idx, "reason": str(err)})
                continue
            used.add_metric([idx, name], float(mem.used))
            total.add_metric([idx, name], float(mem.total))
            util.add_metric([idx, name], rates.gpu / 100.0)
        yield from (used, total, util)
