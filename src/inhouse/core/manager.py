"""Model lifecycle: LOADING → READY → DRAINING → UNLOADED, or FAILED(reason, code).

Loading a new version never interrupts the serving one: the new one is loaded and warmed up
beside it, traffic switches when it is READY, and the old one drains its in-flight requests
before it is unloaded. A failed load leaves whatever was serving in place."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np

from inhouse.backends import ArtefactDecryptor, Backend, LoadContext, LoadedModel, get_backend
from inhouse.core.datatypes import numpy_dtype
from inhouse.core.memory import available_memory_bytes, pin_mmap_threshold
from inhouse.core.recorders import NULL_RECORDERS, Recorders, attach_recorders
from inhouse.core.repository import ModelRepository, link_layout
from inhouse.core.scheduling import DynamicBatcher, Scheduler
from inhouse.core.spec import ModelSpec, OverflowSpec, find_spec_file
from inhouse.errors import (
    InferenceError,
    InhouseError,
    ModelLoadError,
    ModelLoadTimeoutError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelSpecError,
    OutOfMemoryError,
    UpstreamUnavailableError,
)

log = logging.getLogger(__name__)
UPSTREAM_DOWN = UpstreamUnavailableError.code


class ModelState(enum.StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"
    UNLOADED = "UNLOADED"
    FAILED = "FAILED"


SchedulerFactory = Callable[[LoadedModel, ModelSpec], Scheduler]
Lifecycle = Callable[[str], Awaitable[Any]]  # load or unload one model by name


class Placement(Protocol):
    """Where a model runs when not in this process (Ray Serve): the backend that places it,
    or None to load it here."""

    def backend_for(self, spec: ModelSpec) -> Backend | None: ...

    def copies(self, spec: ModelSpec) -> int:
        """How many processes on this machine load their own copy of the model (they share its cores)."""
        ...

    def close(self) -> None: ...


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    spec: ModelSpec
    fingerprint: str
    state: ModelState = ModelState.LOADING
    reason: str = ""
    code: int | None = None
    model: LoadedModel | None = None
    scheduler: Scheduler | None = None
    loaded_at: float = 0.0
    inflight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()


@dataclass
class IndexEntry:
    name: str
    version: int | None
    state: str
    reason: str = ""
    code: int | None = None


class ModelManager:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        scheduler_factory: SchedulerFactory | None = None,
        decryptor: ArtefactDecryptor | None = None,
        backend_options: dict[str, Any] | None = None,
        drain_timeout_s: float = 30.0,
        load_timeout_s: float | None = None,
        load_workers: int = 2,
        placement: Placement | None = None,
    ) -> None:
        self.repository = repository
        pin_mmap_threshold()  # so that unloading a model gives its memory back (see memory.py)
        self._scheduler_factory = scheduler_factory or (lambda m, s: DynamicBatcher(m, s))
        self._decryptor = decryptor
        self._backend_options = backend_options or {}
        self._drain_timeout_s = drain_timeout_s
        self._load_timeout_s = load_timeout_s
        self._placement = placement
        self._serving: dict[str, dict[int, ModelVersion]] = {}
        self._records: dict[tuple[str, int | None], ModelVersion | IndexEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loader = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="inhouse-load")
        self._background: set[asyncio.Task[None]] = set()
        self._failed_at: dict[str, str] = {}
        # models deliberately not serving (unloaded, or left out at start-up), with the files'
        # fingerprint at that moment: polling leaves them alone until their files change
        self._parked: dict[str, str] = {}
        self.listeners: list[Callable[[str, int | None, ModelState], None]] = []
        # metrics recorders handed to each version's scheduler / engine (observability sets it)
        self.recorders: Recorders = NULL_RECORDERS

    def set_decryptor(self, decryptor: ArtefactDecryptor | None) -> None:
        """Decrypt artefacts (in memory) with this from the next load on."""
        self._decryptor = decryptor

    # ---- request path -------------------------------------------------------------------
    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The READY version to serve (the newest, unless one is named)."""
        table = self._serving.get(name)
        if not table:
            self._raise_unavailable(name, version)
        if version is None:
            return table[max(table)]
        mv = table.get(version)
        if mv is None:
            raise ModelNotFoundError(
                f"Model '{name}' has no version {version} serving; serving versions: "
                f"{sorted(table)}."
            )
        return mv

    @contextmanager
    def use(self, name: str, version: int | None = None) -> Iterator[ModelVersion]:
        mv = self.resolve(name, version)
        mv.enter()
        try:
            yield mv
        finally:
            mv.leave()

    def _raise_unavailable(self, name: str, version: int | None) -> NoReturn:
        try:
            self.repository.model_dir(name)
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"Model '{name}' is not in the repository; available: "
                f"{', '.join(self.repository.model_names()) or 'none'}."
            ) from None
        states = [r for (n, _), r in self._records.items() if n == name]
        loading = [r for r in states if r.state == ModelState.LOADING]
        failed = [r for r in states if r.state == ModelState.FAILED]
        if loading:
            raise ModelNotReadyError(f"Model '{name}' is still loading; retry shortly.",
                                     headers={"Retry-After": "1"})
        if failed:
            raise ModelNotReadyError(
                f"Model '{name}' failed to load: {failed[-1].reason}", details={"cause_code": failed[-1].code}
            )
        raise ModelNotReadyError(
            f"Model '{name}' is not loaded; load it with POST /v2/repository/models/{name}/load "
            f"or 'inhouse models load {name}'."
        )

    def is_ready(self, name: str, version: int | None = None) -> bool:
        table = self._serving.get(name)
        if not table:
            return False
        mv = table.get(version) if version is not None else table[max(table)]
        return mv is not None and unhealthy(mv) is None

    def healthy(self, name: str) -> tuple[ModelVersion | None, str]:
        """The serving version of ``name`` when it can answer now, else None and why not."""
        try:
            mv = self.resolve(name)
        except InhouseError as err:
            return None, err.message
        down = unhealthy(mv)
        return (mv, "") if down is None else (None, down)

    def fallback(self, name: str, rule: OverflowSpec, why: str) -> ModelVersion:
        """What answers for ``name`` while its overflow model is down (``why``): the rule's
        fallback, or a 503 (3006) that says why there is none."""
        if rule.fallback is not None:
            fallback, why_fb = self.healthy(rule.fallback)
            if fallback is not None:
                return fallback
            why += f"; its fallback '{rule.fallback}' too: {why_fb}"
        raise UpstreamUnavailableError(
            f"Model '{name}' is saturated and its overflow model '{rule.to}' is unavailable: {why}. "
            "Retry shortly.", headers={"Retry-After": "1"})

    def serving_spec(self, name: str) -> ModelSpec | None:
        """The spec of the version a request without a version goes to, or None. Cheap: it sits
        on the request path (security policy lookups)."""
        table = self._serving.get(name)
        return table[max(table)].spec if table else None

    def serving(self) -> dict[str, list[ModelVersion]]:
        return {n: [t[v] for v in sorted(t, reverse=True)] for n, t in self._serving.items() if t}

    # ---- lifecycle ------------------------------------------------------------------------
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _notify(self, name: str, version: int | None, state: ModelState) -> None:
        for cb in self.listeners:
            try:
                cb(name, version, state)
            except Exception:  # a listener must never break the lifecycle
                log.exception("model state listener failed")

    async def load(self, name: str, overrides: dict[str, Any] | None = None) -> list[ModelVersion]:
        """Load (or reload) a model per its version policy. Raises the load error; whatever
        was serving before keeps serving."""
        async with self._lock(name):
            try:
                spec = self.repository.read_spec(name, overrides)
                wanted = self.repository.select_versions(spec)
            except InhouseError as err:
                if not isinstance(err, ModelNotFoundError):
                    self._records[(name, None)] = IndexEntry(name, None, ModelState.FAILED, err.message, err.code)
                    self._notify(name, None, ModelState.FAILED)
                raise
            self._records.pop((name, None), None)
            self._parked.pop(name, None)
            current = self._serving.get(name, {})
            force = overrides is not None
            new_table: dict[int, ModelVersion] = {}
            fresh: list[ModelVersion] = []
            try:
                for v in wanted:
                    fp = self.repository.fingerprint(name, v)
                    old = current.get(v)
                    if old is not None and old.fingerprint == fp and old.spec == spec and not force:
                        new_table[v] = old
                        continue
                    mv = ModelVersion(name, v, spec, fp)
                    self._records[(name, v)] = mv
                    self._notify(name, v, ModelState.LOADING)
                    fresh.append(mv)
                    await self._load_version(mv)
                    new_table[v] = mv
            except InhouseError:
                for mv in fresh:
                    if mv.state == ModelState.READY:
                        await self._close_version(mv, ModelState.UNLOADED, "load of a sibling version failed")
                    if (name, mv.version) in self._records and mv.state != ModelState.FAILED:
                        self._records[(name, mv.version)] = current.get(mv.version) or mv
                raise
            self._serving[name] = new_table
            for v, old in current.items():
                if new_table.get(v) is not old:
                    self._spawn(self._retire(old))
            return [new_table[v] for v in wanted]

    async def load_from(self, name: str, folder: Path, spec_file: Path | None) -> list[ModelVersion]:
        """Load ``name`` from a folder outside the repository's layout (see
        ``repository.link_layout``). The spec is read first, so a bad one links nothing; a failed
        load puts back whatever the name was linked to before."""
        link = link_layout(name, folder, spec_file)
        self.repository.read_linked_spec(name, link)
        if (self.repository.linked(name) is None and self.repository.model_dir_if_any(name) == folder
                and link.spec_file == find_spec_file(folder)):
            return await self.load(name)  # the repository's own folder for this model: an ordinary load
        previous = self.repository.link(name, link)
        try:
            return await self.load(name)
        except InhouseError:
            self.repository.link(name, previous)
            raise

    async def _load_version(self, mv: ModelVersion) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        log.info("loading model", extra={"model": mv.name, "version": mv.version})
        try:
            model, scheduler = await self._run_load(loop, mv)
        except InhouseError as err:
            mv.state, mv.reason, mv.code = ModelState.FAILED, err.message, err.code
            log.error("model load failed", extra={"model": mv.name, "version": mv.version,
                                                 "code": err.code, "reason": err.message})
            self._notify(mv.name, mv.version, ModelState.FAILED)
            raise
        except MemoryError:
            err2 = OutOfMemoryError(f"Out of memory while loading model '{mv.name}' version {mv.version}.")
            mv.state, mv.reason, mv.code = ModelState.FAILED, err2.message, err2.code
            self._notify(mv.name, mv.version, ModelState.FAILED)
            raise err2 from None
        except Exception as exc:
            log.exception("unexpected error loading model")
            err3 = ModelLoadError(f"Loading model '{mv.name}' version {mv.version} failed: "
                                  f"{type(exc).__name__}: {exc}")
            mv.state, mv.reason, mv.code = ModelState.FAILED, err3.message, err3.code
            self._notify(mv.name, mv.version, ModelState.FAILED)
            raise err3 from None
        mv.model = model
        mv.scheduler = scheduler
        attach_recorders(self.recorders, mv.name, mv.version, mv.scheduler, model)
        watch = getattr(model, "on_failure", None)  # engines in child processes report a lasting crash
        if callable(watch):
            watch(lambda reason: loop.call_soon_threadsafe(self._spawn, self._fail_serving(mv, reason)))
        mv.state, mv.reason, mv.code = ModelState.READY, "", None
        mv.loaded_at = time.time()
        log.info("model ready", extra={"model": mv.name, "version": mv.version,
                                       "latency_ms": round((time.perf_counter() - started) * 1000, 1)})
        self._notify(mv.name, mv.version, ModelState.READY)

    async def _run_load(self, loop: asyncio.AbstractEventLoop, mv: ModelVersion) -> tuple[LoadedModel, Scheduler]:
        """The load thread's result, or 1009 once the version's load timeout passes. A thread
        cannot be stopped, so one that finishes after its caller gave up has its model closed."""
        work = loop.run_in_executor(self._loader, self._load_blocking, mv)
        limit = mv.spec.load.timeout_s or self._load_timeout_s
        try:
            done, _ = await asyncio.wait({work}, timeout=limit)
        except asyncio.CancelledError:
            work.add_done_callback(self._close_late)
            raise
        if not done:
            work.add_done_callback(self._close_late)
            raise ModelLoadTimeoutError(
                f"Loading model '{mv.name}' version {mv.version} took longer than its {limit:g} s load "
                "timeout; raise load.timeout_s in its model.yaml (or the server's load_timeout_s), or make "
                "the load lighter (fewer warmup.samples)."
            )
        return work.result()

    def _close_late(self, work: asyncio.Future[tuple[LoadedModel, Scheduler]]) -> None:
        if work.cancelled() or work.exception() is not None:
            return
        model, scheduler = work.result()
        log.warning("a model load that timed out finished later; closing what it loaded")
        self._spawn(self._close_orphan(model, scheduler))

    async def _close_orphan(self, model: LoadedModel, scheduler: Scheduler) -> None:
        await scheduler.close()
        await asyncio.get_running_loop().run_in_executor(self._loader, model.close)

    def _load_blocking(self, mv: ModelVersion) -> tuple[LoadedModel, Scheduler]:
        placed = self._placement.backend_for(mv.spec) if self._placement is not None else None
        backend = placed or get_backend(mv.spec.backend)
        if placed is None:
            check_memory(mv.spec)  # a placed model needs the memory of its cluster's nodes, not this one
        model_dir = self.repository.model_dir(mv.name)
        options = self._backend_options
        if placed is None and self._placement is not None:
            options = {**options, "copies": self._placement.copies(mv.spec)}
        ctx = LoadContext(model_dir=model_dir, version_dir=self.repository.version_dir(mv.name, mv.version),
                          spec=mv.spec,
                          decryptor=self._decryptor, options=options,
                          progress=lambda pct, what: self._progress(mv, pct, what))
        model = backend.load(ctx)
        try:
            warmup(model, mv.spec, model_dir)
            # a model placed elsewhere brings its own request path (its replicas batch)
            own = getattr(model, "make_scheduler", None)
            scheduler = own() if callable(own) else self._scheduler_factory(model, mv.spec)
        except BaseException:
            model.close()
            raise
        return model, scheduler

    @staticmethod
    def _progress(mv: ModelVersion, pct: float, what: str) -> None:
        if mv.state == ModelState.LOADING:  # a load that timed out keeps its FAILED reason
            mv.reason = f"{what}: {pct:.0f}%"

    async def unload(self, name: str) -> list[ModelVersion]:
        async with self._lock(name):
            table = self._serving.pop(name, None)
            if not table:
                self.repository.model_dir(name)  # unknown name → 1002 not found
                raise ModelNotReadyError(f"Model '{name}' is not loaded, so there is nothing to unload.")
            versions = list(table.values())
            self.park([name])
            await asyncio.gather(*(self._retire(mv) for mv in versions))
            return versions

    def park(self, names: list[str]) -> None:
        """Mark models as deliberately not serving: repository polling will not load them
        again unless their files change (or they are loaded explicitly)."""
        for name in names:
            self._parked[name] = self.repository.model_fingerprint(name)

    async def _retire(self, mv: ModelVersion) -> None:
        mv.state = ModelState.DRAINING
        self._notify(mv.name, mv.version, ModelState.DRAINING)
        try:
            await asyncio.wait_for(mv.drained(), self._drain_timeout_s)
        except TimeoutError:
            log.warning("drain timed out; unloading with requests in flight",
                        extra={"model": mv.name, "version": mv.version})
        await self._close_version(mv, ModelState.UNLOADED, "unloaded")

    async def _close_version(self, mv: ModelVersion, state: ModelState, reason: str) -> None:
        if mv.scheduler is not None:
            await mv.scheduler.close()
        model, mv.model, mv.scheduler = mv.model, None, None
        if model is not None:
            await asyncio.get_running_loop().run_in_executor(self._loader, model.close)
        mv.state, mv.reason = state, reason
        if self._records.get((mv.name, mv.version)) is mv:
            self._records[(mv.name, mv.version)] = IndexEntry(mv.name, mv.version, state, reason)
        self._notify(mv.name, mv.version, state)

    async def _fail_serving(self, mv: ModelVersion, reason: str) -> None:
        """A serving version whose engine died for good: out of serving, FAILED with the reason."""
        async with self._lock(mv.name):
            table = self._serving.get(mv.name, {})
            if table.get(mv.version) is not mv:
                return  # already replaced or unloaded
            del table[mv.version]
            log.error("serving model failed", extra={"model": mv.name, "version": mv.version, "reason": reason})
            await self._close_version(mv, ModelState.FAILED, reason)
            mv.code = InferenceError.code
            self._records[(mv.name, mv.version)] = IndexEntry(mv.name, mv.version, ModelState.FAILED, reason,
                                                              InferenceError.code)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait until background retirements finish (tests and shutdown use this)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def load_many(self, names: list[str]) -> dict[str, InhouseError | None]:
        results: dict[str, InhouseError | None] = {}
        for n in names:
            try:
                await self.load(n)
                results[n] = None
            except InhouseError as err:
                results[n] = err
        return results

    async def reconcile(self, load: Lifecycle | None = None, unload: Lifecycle | None = None) -> None:
        """Bring the serving set in line with the repository (used by polling): load new models,
        reload changed versions, unload removed ones. ``load`` / ``unload`` replace this
        manager's own (with workers, the calls that apply a change in every worker)."""
        load = load or self.load
        unload = unload or self.unload
        on_disk = set(self.repository.model_names())
        for name in sorted(set(self._serving) - on_disk):
            log.info("model removed from repository; unloading", extra={"model": name})
            with suppress(InhouseError):
                await unload(name)
            self._records = {k: v for k, v in self._records.items() if k[0] != name}
        self._parked = {n: fp for n, fp in self._parked.items() if n in on_disk}
        for name in sorted(on_disk):
            parked = self._parked.get(name)
            if parked is not None and parked == self.repository.model_fingerprint(name):
                continue  # unloaded on purpose and unchanged since
            try:
                spec = self.repository.read_spec(name)
                wanted = self.repository.select_versions(spec)
                table = self._serving.get(name, {})
                changed = set(wanted) != set(table) or any(
                    table[v].fingerprint != self.repository.fingerprint(name, v) for v in wanted
                )
            except InhouseError:
                changed = True
            fp = self.repository.model_fingerprint(name)
            if not changed or self._failed_at.get(name) == fp:
                continue  # unchanged, or unchanged since its last failed load
            try:
                await load(name)
                self._failed_at.pop(name, None)
            except InhouseError as err:
                self._failed_at[name] = fp
                log.error("reload from repository failed", extra={"model": name, "code": err.code})

    def index(self) -> list[IndexEntry]:
        entries: dict[tuple[str, int | None], IndexEntry] = {}
        for name in self.repository.model_names():
            entries[(name, None)] = IndexEntry(name, None, ModelState.UNLOADED, "not loaded")
        for key, rec in self._records.items():
            entries.pop((key[0], None), None)
            if isinstance(rec, ModelVersion):
                entries[key] = IndexEntry(rec.name, rec.version, rec.state, rec.reason, rec.code)
            else:
                entries[key] = rec
        for name, table in self._serving.items():
            model_entry = entries.get((name, None))
            if model_entry is not None and model_entry.state != ModelState.FAILED:
                entries.pop((name, None))  # a failed reload stays visible beside the serving versions
            for v, mv in table.items():
                down = unhealthy(mv)
                entries[(name, v)] = (IndexEntry(name, v, mv.state, mv.reason, mv.code) if down is None else
                                      IndexEntry(name, v, ModelState.FAILED, down, UPSTREAM_DOWN))
        return sorted(entries.values(), key=lambda e: (e.name, -(e.version or 0)))

    async def close(self) -> None:
        for name in list(self._serving):
            with suppress(InhouseError):
                await self.unload(name)
        await self.settle()
        if self._placement is not None:
            await asyncio.get_running_loop().run_in_executor(self._loader, self._placement.close)
        self._loader.shutdown(wait=False)


def unhealthy(mv: ModelVersion) -> str | None:
    """Why a serving version cannot answer now, for models that report it (an upstream whose
    circuit is open); None when it can. It stays in the serving table and comes back by itself."""
    health = getattr(mv.model, "health", None)
    return health() if callable(health) else None


def check_memory(spec: ModelSpec) -> None:
    """Refuse a load whose ``resources.memory`` cannot fit before it starts, instead of
    letting the machine swap or the kernel kill the server halfway through."""
    need = spec.resources.memory
    if need is None:
        return
    free = available_memory_bytes()
    if free is not None and need > free:
        raise OutOfMemoryError(
            f"Model '{spec.name}' declares resources.memory of {need / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB is available; unload another model, free memory, or lower "
            "resources.memory if the model needs less."
        )


def synthetic_inputs(model: LoadedModel, batch: int = 1) -> dict[str, np.ndarray]:
    """Inputs shaped like the model's, for warm-up: dynamic dims become ``batch`` / 1."""
    out: dict[str, np.ndarray] = {}
    for t in model.inputs:
        shape = [d if d > 0 else (batch if i == 0 else 1) for i, d in enumerate(t.shape)]
        dtype = numpy_dtype(t.dtype)
        arr = np.full(shape, b"warmup", dtype=object) if t.dtype == "BYTES" else np.zeros(shape, dtype=dtype)
        out[t.name] = arr
    return out


def warmup_samples(model: LoadedModel, spec: ModelSpec, model_dir: Path) -> list[dict[str, np.ndarray]]:
    """The warm-up calls to make: the user's ``warmup.file`` (.npz, one array per input name,
    used as one request) or synthetic zeros at batch 1 and at each preferred batch size."""
    cfg = spec.warmup
    if cfg.file:
        return [_load_npz(model, spec, model_dir / cfg.file)] * max(1, cfg.samples)
    if cfg.samples <= 0:
        return []
    sizes = [1]
    if spec.batching.max_batch_size > 0 and model.inputs and all(t.shape and t.shape[0] == -1
                                                                 for t in model.inputs):
        sizes += [b for b in spec.batching.preferred_batch_sizes if b > 1]
    return [synthetic_inputs(model, sizes[i % len(sizes)]) for i in range(max(cfg.samples, len(sizes)))]


def _load_npz(model: LoadedModel, spec: ModelSpec, path: Path) -> dict[str, np.ndarray]:
    where = f"warmup.file of model '{spec.name}' ({path})"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ModelSpecError(f"The {where} does not exist; create it with numpy.savez or remove warmup.file.") from None
    except (OSError, ValueError) as err:
        raise ModelSpecError(f"The {where} is not a readable .npz file: {err}.") from None
    names = {t.name for t in model.inputs}
    unknown = sorted(set(arrays) - names)
    missing = sorted(t.name for t in model.inputs if t.name not in arrays and not t.optional)
    if unknown or missing:
        raise ModelSpecError(
            f"The {where} must hold one array per model input {sorted(names)}; "
            f"{'unknown: ' + str(unknown) if unknown else ''}{' ' if unknown and missing else ''}"
            f"{'missing: ' + str(missing) if missing else ''}."
        )
    for t in model.inputs:
        arr = arrays.get(t.name)
        if arr is None:
            continue
        if t.dtype == "BYTES":
            if arr.dtype.kind not in ("U", "S"):
                raise ModelSpecError(f"The {where}: input '{t.name}' is BYTES, so the array must hold text.")
            arrays[t.name] = np.vectorize(lambda x: x.encode() if isinstance(x, str) else x,
                                          otypes=[object])(arr)
        elif arr.dtype != numpy_dtype(t.dtype):
            raise ModelSpecError(f"The {where}: input '{t.name}' must be {t.dtype} "
                                 f"({numpy_dtype(t.dtype)}), not {arr.dtype}.")
        if arr.ndim != len(t.shape) or any(w != -1 and g != w for g, w in zip(arr.shape, t.shape, strict=False)):
            raise ModelSpecError(f"The {where}: input '{t.name}' has shape {list(arr.shape)}, which does not "
                                 f"match {t.shape}.")
    return arrays


def warmup(model: LoadedModel, spec: ModelSpec, model_dir: Path) -> None:
    """Run the warm-up calls so the first real request does not pay for lazy initialisation
    (memory arenas, kernel selection); the model turns READY only after them."""
    for sample in warmup_samples(model, spec, model_dir):
        model.predict(sample, None)
