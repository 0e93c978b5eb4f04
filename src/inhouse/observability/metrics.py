"""Prometheus metrics on an injected ``CollectorRegistry`` (no global state).

Hot-path cost is kept to a dict lookup and one or two histogram observations per request:
labelled children are created once per model version and cached, and everything that can be
read at scrape time (queue depth, in-flight requests, model states, process and GPU memory) is
read then, by collectors, instead of being updated per request."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inhouse.core.manager import ModelState
from inhouse.core.recorders import LLMRecorder, SchedulerRecorder
from inhouse.errors import InhouseError, ModelNotFoundError
from inhouse.observability.context import current
from inhouse.observability.fast import CounterChild, FastCounter, FastHistogram, HistogramChild
from inhouse.observability.statistics import Statistics, VersionStatistics

# From a 100 µs tabular model to a 2-minute generation.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UNKNOWN_MODEL = "_unknown"  # label for requests naming no known model (keeps cardinality bounded)


def outcome_of(err: BaseException) -> tuple[str, str]:
    """(outcome, code) labels for a failed request."""
    if not isinstance(err, InhouseError):
        return "server_error", "9000"
    status = err.http_status
    if status in (429, 503):
        outcome = "rejected"
    elif status == 504:
        outcome = "timeout"
    elif status >= 500:
        outcome = "server_error"
    else:
        outcome = "client_error"
    return outcome, str(err.code)


class Metrics:
    """Every metric inhouse exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        mv = ["model", "version"]
        self.requests = FastCounter("inhouse_inference_requests", "Inference requests by outcome and error code.",
                                [*mv, "outcome", "code"], registry=r)
        self.latency = FastHistogram("model_inference_latency_seconds",
                                 "Total time of an inference request inside the server (validation, queue, "
                                 "compute, response building).", mv, buckets=LATENCY_BUCKETS, registry=r)
        self.queue = FastHistogram("inhouse_queue_duration_seconds", "Time a request waited for a model instance.",
                               mv, buckets=LATENCY_BUCKETS, registry=r)
        self.compute = FastHistogram("inhouse_compute_duration_seconds", "Time of one backend call (one batch).",
                                 mv, buckets=LATENCY_BUCKETS, registry=r)
        self.batch = FastHistogram("inhouse_batch_size", "Requests served by one backend call.", mv,
                               buckets=BATCH_BUCKETS, registry=r)
        self.load = Histogram("inhouse_model_load_duration_seconds",
                              "Time from LOADING to READY or FAILED, warm-up included.", ["model"],
                              buckets=LOAD_BUCKETS, registry=r)
        self.unload = Histogram("inhouse_model_unload_duration_seconds",
                                "Time from DRAINING to UNLOADED, draining included.", ["model"],
                                buckets=LOAD_BUCKETS, registry=r)
        self.load_failures = Counter("inhouse_model_load_failures", "Model loads that ended FAILED.",
                                     ["model", "code"], registry=r)
        self.prompt_tokens = FastCounter("inhouse_llm_prompt_tokens", "Prompt tokens processed.", mv, registry=r)
        self.completion_tokens = FastCounter("inhouse_llm_completion_tokens", "Tokens generated.", mv, registry=r)
        self.ttft = FastHistogram("inhouse_llm_time_to_first_token_seconds", "Time to the first generated token.",
                              mv, buckets=TTFT_BUCKETS, registry=r)
        self.itl = FastHistogram("inhouse_llm_inter_token_latency_seconds", "Time between generated tokens.",
                             mv, buckets=TOKEN_BUCKETS, registry=r)
        self.kv_cache = Gauge("inhouse_llm_kv_cache_usage_ratio", "Fraction of the KV cache in use.", mv,
                              registry=r)
        self.prefix_queries = FastCounter("inhouse_llm_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache.", mv, registry=r)
        self.prefix_hits = FastCounter("inhouse_llm_prefix_cache_hit_tokens",
                                   "Prompt tokens found in the prefix cache.", mv, registry=r)
        self.cache_lookups = FastCounter("inhouse_response_cache_lookups",
                                         "Response cache lookups by result (hit, miss).", [*mv, "result"], registry=r)
        self.cache_errors = FastCounter("inhouse_response_cache_errors", "Response cache store failures; the "
                                        "requests were served uncached.", ["store"], registry=r)
        self.grpc = GrpcMetrics(r)
        self.statistics = Statistics()  # the same numbers in the v2 statistics extension's layout
        self._per_version: dict[tuple[str, int], _VersionMetrics] = {}

    # ---- Recorders (the manager asks once per loaded version) ---------------------------
    def scheduler(self, model: str, version: int) -> SchedulerRecorder:
        return self._version(model, version)

    def llm(self, model: str, version: int) -> LLMRecorder:
        return _LLMMetrics(self, model, str(version))

    # ---- InferObserver (the data plane calls it once per request) ------------------------
    def infer_done(self, model: str, version: int, seconds: float) -> None:
        vm = self._per_version.get((model, version)) or self._version(model, version)
        vm.ok.inc()
        vm.latency.observe(seconds)
        vm.stats.done(seconds)

    def infer_failed(self, model: str, version: int | None, error: BaseException,
                     seconds: float | None) -> None:
        # Label values must stay bounded whatever clients send: names and versions that are not
        # loaded collapse into one series.
        known = [v for (m, v) in self._per_version if m == model]
        if version is None and known:
            version = max(known)  # the version that would have served it
        if version not in known:
            version = None
            if not known and isinstance(error, ModelNotFoundError):
                model = UNKNOWN_MODEL
        outcome, code = outcome_of(error)
        label = "" if version is None else str(version)
        self.requests.labels(model, label, outcome, code).inc()
        if seconds is not None:
            self.latency.labels(model, label).observe(seconds)
            if version is not None:
                self.statistics.version(model, version).failed(seconds)

    # ---- CacheRecorder (the response cache calls it once per lookup) ------------------------
    def cache_lookup(self, model: str, version: int, hit: bool, seconds: float) -> None:
        self.cache_lookups.labels(model, str(version), "hit" if hit else "miss").inc()
        self.statistics.version(model, version).cache(hit, seconds)

    def cache_error(self, store: str) -> None:
        self.cache_errors.labels(store).inc()

    def _known(self, model: str) -> bool:
        return any(m == model for (m, _) in self._per_version)

    def _version(self, model: str, version: int) -> _VersionMetrics:
        vm = self._per_version.get((model, version))
        if vm is None:
            vm = self._per_version[(model, version)] = _VersionMetrics(self, model, str(version))
        return vm

    def forget(self, model: str, version: int) -> None:
        """Drop a retired version's series, so unloaded versions do not linger in every scrape."""
        self.statistics.forget(model, version)
        if self._per_version.pop((model, version), None) is None:
            return
        label = str(version)
        for metric in (self.latency, self.queue, self.compute, self.batch, self.prompt_tokens,
                       self.completion_tokens, self.ttft, self.itl, self.kv_cache, self.prefix_queries,
                       self.prefix_hits):
            _remove(metric, model, label)
        for family in (self.requests, self.cache_lookups):
            for key in family.label_sets():
                if key[0] == model and key[1] == label:
                    family.remove(*key)


class GrpcMetrics:
    """The names go-grpc-prometheus / py-grpc-prometheus use, so existing dashboards work."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = FastCounter("grpc_server_started", "RPCs started on the server.", labels, registry=registry)
        self.handled = FastCounter("grpc_server_handled", "RPCs completed on the server, by status code.",
                               [*labels, "grpc_code"], registry=registry)
        self.seconds = FastHistogram("grpc_server_handling_seconds", "RPC handling time until the status is sent.",
                                 labels, buckets=LATENCY_BUCKETS, registry=registry)
        self.msg_sent = FastCounter("grpc_server_msg_sent", "Stream messages sent by the server.", labels,
                                registry=registry)


def _remove(metric: FastHistogram | FastCounter | Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


@dataclass(slots=True)
class _VersionMetrics:
    """Pre-resolved children for one model version: no label lookups on the hot path."""

    ok: CounterChild
    latency: HistogramChild
    queue: HistogramChild
    compute: HistogramChild
    batch: HistogramChild
    stats: VersionStatistics

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self.ok = m.requests.labels(model, version, "success", "ok")
        self.latency = m.latency.labels(model, version)
        self.queue = m.queue.labels(model, version)
        self.compute = m.compute.labels(model, version)
        self.batch = m.batch.labels(model, version)
        self.stats = m.statistics.version(model, int(version))

    def observe_queue(self, seconds: float) -> None:
        self.queue.observe(seconds)
        self.stats.queued(seconds)
        ctx = current()
        if ctx is not None:
            ctx.queue_s = seconds

    def observe_compute(self, seconds: float, batch_size: int = 1) -> None:
        self.compute.observe(seconds)
        self.batch.observe(batch_size)
        self.stats.computed(seconds, batch_size)
        ctx = current()
        if ctx is not None:
            ctx.compute_s, ctx.compute_end_ns, ctx.batch_size = seconds, time.time_ns(), batch_size


class _LLMMetrics:
    __slots__ = ("_completion", "_hits", "_itl", "_kv", "_prompt", "_queries", "_ttft")

    def __init__(self, m: Metrics, model: str, version: str) -> None:
        self._prompt = m.prompt_tokens.labels(model, version)
        self._completion = m.completion_tokens.labels(model, version)
        self._ttft = m.ttft.labels(model, version)
        self._itl = m.itl.labels(model, version)
        self._kv = m.kv_cache.labels(model, version)
        self._queries = m.prefix_queries.labels(model, version)
        self._hits = m.prefix_hits.labels(model, version)

    def observe_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            self._prompt.inc(prompt_tokens)
        if completion_tokens:
            self._completion.inc(completion_tokens)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token_latency(self, seconds: float, tokens: int = 1) -> None:
        if tokens <= 1:
            self._itl.observe(seconds)
            return
        per = seconds / tokens
        for _ in range(tokens):
            self._itl.observe(per)

    def set_kv_cache_usage(self, ratio: float) -> None:
        self._kv.set(ratio)

    def observe_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self._queries.inc(queried_tokens)
        if hit_tokens:
            self._hits.inc(hit_tokens)


class LifecycleRecorder:
    """A ``ModelManager`` listener: load / unload durations, load failures, and dropping the
    series of versions that were unloaded."""

    def __init__(self, metrics: Metrics, failure_code: Callable[[str, int | None], int | None],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._metrics = metrics
        self._failure_code = failure_code
        self._clock = clock
        self._since: dict[tuple[str, int | None], float] = {}

    def __call__(self, model: str, version: int | None, state: ModelState) -> None:
        key, now = (model, version), self._clock()
        if state in (ModelState.LOADING, ModelState.DRAINING):
            self._since[key] = now
            return
        started = self._since.pop(key, None)
        if state == ModelState.READY:
            if started is not None:
                self._metrics.load.labels(model).observe(now - started)
        elif state == ModelState.FAILED:
            if started is not None:
                self._metrics.load.labels(model).observe(now - started)
            code = self._failure_code(model, version)
            self._metrics.load_failures.labels(model, str(code) if code is not None else "").inc()
        elif state == ModelState.UNLOADED:
            if started is not None:
                self._metrics.unload.labels(model).observe(now - started)
            if version is not None:
                self._metrics.forget(model, version)
