"""The data plane: the one place every protocol adapter calls. It validates requests against
the model's tensors, routes them to the right version's scheduler and builds responses.
Nothing here knows about HTTP or gRPC."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inhouse import __version__
from inhouse.core.datatypes import v2_datatype
from inhouse.core.manager import IndexEntry, ModelManager, ModelVersion
from inhouse.core.recorders import InferObserver, StatisticsSource
from inhouse.core.response_cache import ResponseCache, decode_infer, encode_infer, infer_canonical
from inhouse.core.spec import TensorSpec
from inhouse.core.triton_config import triton_config
from inhouse.core.types import InferRequest, InferResponse, OutputTensor
from inhouse.errors import (
    DatatypeError,
    ForbiddenError,
    InferenceError,
    InhouseError,
    InputNameError,
    InvalidRequestError,
    ShapeError,
    UpstreamUnavailableError,
)

EXTENSIONS = ["model_repository", "binary_tensor_data", "parameters", "schedule_policy", "model_configuration",
              "statistics", "generate"]


@dataclass
class ServerState:
    """Readiness as the server sees it (start-up loading done, not shutting down)."""

    started: bool = False
    shutting_down: bool = False
    extensions: list[str] = field(default_factory=lambda: list(EXTENSIONS))


class SourceCheck(Protocol):
    """Raises when a path a load request names (``source``, relative to the model folder given,
    or the setting ``what``) may not be used; returns it resolved."""

    def __call__(self, source: object, base: Path, *, what: str = ...) -> Path: ...


class DataPlane:
    def __init__(self, manager: ModelManager, state: ServerState | None = None,
                 check_source: SourceCheck | None = None) -> None:
        self.manager = manager
        self.state = state or ServerState()
        self.observer: InferObserver | None = None  # metrics (set by the server when enabled)
        self.statistics: StatisticsSource | None = None  # the v2 statistics extension (set with the metrics)
        self.cache: ResponseCache | None = None  # the response cache (set by the server when configured)
        # injected by the server (security's folder rule), so the core never imports security
        self._check_source = check_source

    # ---- health and metadata --------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.state.started and not self.state.shutting_down

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "inhouse", "version": __version__, "extensions": self.state.extensions}

    def model_ready(self, name: str, version: int | None = None) -> bool:
        return self.manager.is_ready(name, version)

    def model_metadata(self, name: str, version: int | None = None) -> dict[str, Any]:
        mv = self.manager.resolve(name, version)
        model = mv.model
        if model is None:
            raise InferenceError(f"Model '{name}' was unloaded while being read; retry.")
        versions = [str(v.version) for v in self.manager.serving().get(name, [])]
        meta: dict[str, Any] = {
            "name": name,
            "versions": versions if version is None else [str(mv.version)],
            "platform": model.platform,
            "inputs": [_tensor_meta(t) for t in model.inputs],
            "outputs": [_tensor_meta(t) for t in model.outputs],
        }
        if mv.spec.version is not None:
            # v2 metadata has no label field; MLServer keeps a model's own version string in
            # "parameters", where v2 clients that do not know it ignore it
            meta["parameters"] = {"version": mv.spec.version}
        return meta

    def model_config(self, name: str, version: int | None = None) -> dict[str, Any]:
        """The effective model spec, plus Triton's config keys (``max_batch_size``, ``input``,
        ``output``, ``dynamic_batching``, …) for clients written against Triton; the two sets of
        keys do not overlap except ``name`` and ``backend``, which agree."""
        mv = self.manager.resolve(name, version)
        cfg = triton_config(mv)
        spec = mv.spec.model_dump(mode="json", exclude_none=True)
        if mv.model is not None:
            spec["inputs"] = [t.model_dump(exclude_none=True) for t in mv.model.inputs]
            spec["outputs"] = [t.model_dump(exclude_none=True) for t in mv.model.outputs]
        label = spec.pop("version", None)
        cfg.update(spec)
        cfg["version"] = mv.version
        if label is not None:
            cfg["version_label"] = label
        return cfg

    def model_statistics(self, name: str = "", version: int | None = None) -> list[dict[str, Any]]:
        """Statistics of the serving versions: of every model (no name), of one model, or of one
        of its versions (Triton's ``model_stats`` list). An unknown or unloaded model is 1002."""
        if name:
            pairs = [(name, self.manager.resolve(name, version).version)] if version is not None else [
                (name, mv.version) for mv in self._serving_versions(name)]
        else:
            pairs = [(n, mv.version) for n, mvs in sorted(self.manager.serving().items()) for mv in mvs]
        return self.statistics.snapshot(pairs) if self.statistics is not None else []

    def _serving_versions(self, name: str) -> list[ModelVersion]:
        self.manager.resolve(name)  # 1002 when it is not serving
        return sorted(self.manager.serving().get(name, []), key=lambda mv: mv.version)

    def triton_model_config(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Triton's layout only (the gRPC ``ModelConfig`` message)."""
        return triton_config(self.manager.resolve(name, version))

    # ---- repository -----------------------------------------------------------------------
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = self.manager.index()
        if ready_only:
            entries = [e for e in entries if e.state == "READY"]
        return entries

    async def load_model(self, name: str, overrides: dict[str, Any] | None = None) -> list[ModelVersion]:
        if overrides and "source" in overrides and self._check_source is not None:
            self._check_source(overrides["source"], self.manager.repository.model_dir(name))
        return await self.manager.load(name, overrides)

    async def load_model_from(self, name: str, model_path: str, config_path: str = "") -> list[ModelVersion]:
        """Load ``name`` from ``model_path`` with the spec at ``config_path`` (OpenClaw's
        LoadModel). Both must lie inside the repository or ``model_dirs``: a server that loads
        whatever path a client names can be made to run any file on the machine."""
        if self._check_source is None:
            raise ForbiddenError("This server has no rule for which folders models may come from, so it "
                                 "loads models by name only; configure model_dirs.")
        root = self.manager.repository.root
        folder = self._check_source(model_path, root, what="model_path")
        spec_file = self._check_source(config_path, root, what="config_path") if config_path else None
        return await self.manager.load_from(name, folder, spec_file)

    async def unload_model(self, name: str) -> list[ModelVersion]:
        return await self.manager.unload(name)

    # ---- inference ----------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        observer = self.observer
        if observer is None:
            return await self._infer(request)
        start = time.perf_counter()
        try:
            response = await self._infer(request)
        except BaseException as exc:
            observer.infer_failed(request.model, request.version, exc, time.perf_counter() - start)
            raise
        observer.infer_done(request.model, response.version, time.perf_counter() - start)
        return response

    def infer_rejected(self, model: str, error: BaseException) -> None:
        """A request for ``model`` that failed before reaching ``infer`` (malformed body, bad
        version): protocol adapters report it so it is counted like any other failed request."""
        if self.observer is not None:
            self.observer.infer_failed(model, None, error, None)

    async def _infer(self, request: InferRequest, mv: ModelVersion | None = None) -> InferResponse:
        if mv is None:
            mv = self.manager.resolve(request.model, request.version)
            if mv.spec.overflow is not None and request.version is None:
                return await self._infer_overflow(request, mv)
        mv.enter()  # what manager.use() does, without a generator per request
        try:
            model = mv.model
            scheduler = mv.scheduler
            if model is None or scheduler is None:
                raise InferenceError(f"Model '{request.model}' was unloaded mid-request; retry.")
            feed = validate_inputs(request, model.inputs)
            wanted = validate_outputs(request, model.outputs)
            cache = self.cache
            # a generative model's v2 answer is sampled with its defaults: cached only through the
            # LLM APIs, where the request says whether it is deterministic
            if cache is not None and request.cache_tenant is not None and mv.spec.task not in ("chat", "generate"):
                ttl = cache.ttl_for(mv.spec)
                if ttl is not None:
                    return await self._cached(cache, ttl, request, mv, feed, wanted)
            results = await scheduler.submit(feed, wanted, priority=request.priority,
                                             timeout_s=request.timeout_s)
            return build_response(request, mv.version, results, wanted)
        finally:
            mv.leave()

    async def _cached(self, cache: ResponseCache, ttl: float, request: InferRequest, mv: ModelVersion,
                      feed: dict[str, np.ndarray], wanted: list[str] | None) -> InferResponse:
        """The answer from the cache, or from the model and then stored (validated first either
        way, so a bad request is refused the same with and without the cache)."""
        key = cache.key(mv.name, mv.version, mv.fingerprint, request.cache_tenant or "", infer_canonical(request))
        value = await cache.get(mv.name, mv.version, key)
        if value is not None:
            return decode_infer(value, request, mv.version)
        scheduler = mv.scheduler
        if scheduler is None:
            raise InferenceError(f"Model '{request.model}' was unloaded mid-request; retry.")
        results = await scheduler.submit(feed, wanted, priority=request.priority, timeout_s=request.timeout_s)
        response = build_response(request, mv.version, results, wanted)
        await cache.put(key, encode_infer(response), ttl)
        return response


    async def _infer_overflow(self, request: InferRequest, mv: ModelVersion) -> InferResponse:
        target = self._overflow(mv)
        if target is mv:
            return await self._infer(request, mv)
        try:
            return await self._infer(request, target)
        except UpstreamUnavailableError as err:
            # the overflow model went down with this request (before its circuit opened)
            if mv.spec.overflow is None or target.name != mv.spec.overflow.to:
                raise  # the fallback itself failed
            return await self._infer(request, self.manager.fallback(mv.name, mv.spec.overflow, err.message))

    def _overflow(self, mv: ModelVersion) -> ModelVersion:
        """The version that takes a request for ``mv``: itself, unless its queue is past the
        ``overflow`` rule; then the overflow model, or while that one is down the fallback, or a
        503 that says so (a saturated local queue would only answer 429 or time out)."""
        rule = mv.spec.overflow
        scheduler = mv.scheduler
        if rule is None or scheduler is None:
            return mv
        depth = scheduler.queue_depth()  # queued, not running: a busy instance alone is no overflow
        wait = getattr(scheduler, "predicted_wait_s", None)
        when = rule.when
        if not ((when.queue_above is not None and depth > when.queue_above)
                or (when.predicted_wait_ms_above is not None and callable(wait)
                    and wait() * 1000 > when.predicted_wait_ms_above)):
            return mv
        target, why = self.manager.healthy(rule.to)
        return target if target is not None else self.manager.fallback(mv.name, rule, why)


def _tensor_meta(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.dtype, "shape": t.shape}


def validate_inputs(request: InferRequest, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    feed: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[str, int]] | None = None  # named dimension → (input, size) first seen
    for tensor in request.inputs:
        name = tensor.name
        spec = None
        for t in specs:  # models have few inputs
            if t.name == name:
                spec = t
                break
        if spec is None:
            raise InputNameError(
                f"Model '{request.model}' has no input '{name}'; its inputs are {[t.name for t in specs]}."
            )
        if name in feed:
            raise InputNameError(f"Input '{name}' appears more than once in the request.")
        if tensor.datatype != spec.dtype:
            raise DatatypeError(
                f"Input '{name}' of model '{request.model}' must be {spec.dtype}, not {tensor.datatype}."
            )
        shape, want = tensor.shape, spec.shape
        ok = len(shape) == len(want)
        if ok:
            for got, w in zip(shape, want, strict=True):
                if w != -1 and got != w:
                    ok = False
                    break
        if not ok:
            raise ShapeError(
                f"Input '{name}' of model '{request.model}' has shape {shape}, which does "
                f"not match {want} (-1 is any size)."
            )
        feed[name] = tensor.data
        if spec.dim_names is not None:
            sizes = _check_named_dims(request, spec, shape, sizes)
    if len(feed) < len(specs):
        missing = [t.name for t in specs if t.name not in feed and not t.optional]
        if missing:
            raise InputNameError(f"Model '{request.model}' needs input(s) {missing}, which the request lacks.")
    return feed


def _check_named_dims(request: InferRequest, spec: TensorSpec, shape: list[int],
                      sizes: dict[str, tuple[str, int]] | None) -> dict[str, tuple[str, int]]:
    """A dimension name written twice in the spec (``sequence`` on input_ids and attention_mask)
    is one size: every input naming it must have that size in this request."""
    seen = {} if sizes is None else sizes
    for i, dim in enumerate(spec.dim_names or ()):
        if dim is None:
            continue
        first = seen.setdefault(dim, (spec.name, shape[i]))
        if first[1] != shape[i]:
            raise ShapeError(
                f"Dimension '{dim}' of model '{request.model}' is {first[1]} in input '{first[0]}' but "
                f"{shape[i]} in input '{spec.name}' (shape {shape}); inputs sharing a named dimension "
                "must have the same size in it."
            )
    return seen


def validate_outputs(request: InferRequest, specs: list[TensorSpec]) -> list[str] | None:
    if not request.outputs:
        return None
    known = {t.name for t in specs}
    names: list[str] = []
    for out in request.outputs:
        if out.name not in known:
            raise InputNameError(
                f"Model '{request.model}' has no output '{out.name}'; its outputs are {sorted(known)}."
            )
        if out.name in names:
            raise InputNameError(f"Output '{out.name}' is requested more than once.")
        names.append(out.name)
    return names


def build_response(request: InferRequest, version: int, results: dict[str, np.ndarray],
                   wanted: list[str] | None) -> InferResponse:
    outputs: list[OutputTensor] = []
    order = wanted if wanted is not None else list(results)
    for name in order:
        arr = results[name]
        if not isinstance(arr, np.ndarray):
            arr = np.asarray(arr)
        try:
            datatype = v2_datatype(arr.dtype)
        except InhouseError:
            raise InferenceError(f"Model output '{name}' has dtype {arr.dtype}, which v2 cannot carry.") from None
        outputs.append(OutputTensor(name=name, datatype=datatype, shape=list(arr.shape), data=arr))
    return InferResponse(model=request.model, version=version, outputs=outputs, id=request.id)


def parse_version(version: str | None) -> int | None:
    if version is None or version == "":
        return None
    if not version.isdigit() or int(version) <= 0:
        raise InvalidRequestError(f"Model version '{version}' is not a positive integer.")
    return int(version)
