"""Models placed on Ray Serve (``--ray``): each loaded model version is one Ray Serve application
whose replicas run an ordinary inhouse backend (and its dynamic batcher) in Ray worker processes.
This process stays the front door: protocols, keys, audit, metrics and the model lifecycle are
its own; a request reaches a replica through a ``DeploymentHandle`` (no HTTP hop).

``ray`` is an optional extra (``inhouse[ray]``) and is imported only when a placement is made."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from inhouse.backends import LoadContext, LoadedModel, get_backend
from inhouse.core.manager import warmup
from inhouse.core.scheduling import DynamicBatcher, Scheduler
from inhouse.core.spec import ModelSpec, RaySpec, TensorSpec
from inhouse.errors import (
    DeadlineExceededError,
    InferenceError,
    InhouseError,
    MissingExtraError,
    ModelLoadError,
    ModelSpecError,
    QueueFullError,
)

log = logging.getLogger(__name__)

# tasks whose models answer through ``predict`` (the scheduler path); generation engines and
# embedders are driven in-process by the LLM service and are not placed
_PLACEABLE_TASKS = ("tensor", "classification")
_PLACEABLE_BACKENDS = ("onnxruntime",)


class InhouseReplica:
    """One Ray Serve replica: loads the model version with inhouse's own backend, warms it up and
    serves ``predict`` through a ``DynamicBatcher`` of its own. A load failure is kept and
    reported by ``metadata`` (with its code) instead of failing the constructor, which Ray would
    retry and report as a traceback."""

    def __init__(self, model_dir: str, version_dir: str, spec: dict[str, Any], options: dict[str, Any]) -> None:
        self._spec = ModelSpec.model_validate(spec)
        self._model: LoadedModel | None = None
        self._error: InhouseError | None = None
        self._batcher: DynamicBatcher | None = None
        try:
            ctx = LoadContext(model_dir=Path(model_dir), version_dir=Path(version_dir), spec=self._spec,
                              options=options)
            model = get_backend(self._spec.backend).load(ctx)
            try:
                warmup(model, self._spec, Path(model_dir))
            except BaseException:
                model.close()
                raise
            self._model = model
        except InhouseError as err:
            self._error = err
        except Exception as exc:  # what the backend could not classify still reaches the user
            self._error = ModelLoadError(f"Loading model '{self._spec.name}' on a Ray replica failed: "
                                         f"{type(exc).__name__}: {exc}")

    def metadata(self) -> dict[str, Any]:
        if self._error is not None:
            return {"error": _pack_error(self._error)}
        model = self._model
        if model is None:
            return {"error": _pack_error(ModelLoadError("The Ray replica holds no model."))}
        return {"platform": model.platform, "pid": os.getpid(),
                "inputs": [t.model_dump() for t in model.inputs],
                "outputs": [t.model_dump() for t in model.outputs]}

    async def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None,
                      timeout_s: float | None) -> tuple[Any, ...]:
        """``("ok", outputs)`` or ``("error", class, message, headers, details)``: inhouse's
        errors travel as values so the front door raises the same error with the same code."""
        try:
            if self._model is None:
                raise self._error or ModelLoadError("The Ray replica holds no model.")
            if self._batcher is None:  # needs the replica's running event loop
                self._batcher = DynamicBatcher(self._model, self._spec)
            return ("ok", await self._batcher.submit(inputs, outputs, timeout_s=timeout_s))
        except InhouseError as err:
            return _pack_error(err)

    def __del__(self) -> None:  # Ray Serve calls it when the replica stops
        if self._model is not None:
            self._model.close()
            self._model = None


def _pack_error(err: InhouseError) -> tuple[Any, ...]:
    return ("error", type(err), err.message, err.headers, err.details)


def _unpack(result: tuple[Any, ...]) -> dict[str, np.ndarray]:
    if result[0] == "ok":
        out: dict[str, np.ndarray] = result[1]
        return out
    _, cls, message, headers, details = result
    if isinstance(cls, type) and issubclass(cls, InhouseError):
        raise cls(message, headers=headers, details=details)
    raise InferenceError(str(message))


def placed_on_ray(spec: ModelSpec) -> bool:
    """Whether a model goes to Ray when the server has Ray on. Raises 1005 for a ``ray:`` block
    on a model that cannot be placed (an LLM, an encrypted model)."""
    ray = spec.ray
    if ray is not None and not ray.enabled:
        return False
    placeable = spec.task in _PLACEABLE_TASKS and spec.backend in _PLACEABLE_BACKENDS
    if not placeable:
        if ray is not None:
            raise ModelSpecError(
                f"Model '{spec.name}' has a ray: block, but Ray Serve placement serves {'/'.join(_PLACEABLE_TASKS)} "
                f"models of backend {'/'.join(_PLACEABLE_BACKENDS)} (this one is {spec.task} on {spec.backend}); "
                "remove the ray: block or set ray.enabled: false."
            )
        return False
    if spec.encryption is not None:
        if ray is not None:
            raise ModelSpecError(
                f"Model '{spec.name}' is encrypted at rest, and Ray replicas hold no model key; set "
                "ray.enabled: false to serve it in this process."
            )
        return False
    return True


def deployment_options(spec: ModelSpec) -> dict[str, Any]:
    """Ray Serve deployment options from the model's ``ray:`` block (defaults: one replica)."""
    ray = spec.ray or RaySpec()
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": ray.num_cpus, "num_gpus": ray.num_gpus},
        "max_ongoing_requests": ray.max_ongoing_requests,
        "max_queued_requests": spec.batching.max_queue_size,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if ray.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = ray.max_replicas_per_node
    if ray.autoscaling is not None:
        a = ray.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "initial_replicas": max(1, a.min_replicas), "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
        }
    else:
        opts["num_replicas"] = ray.replicas
    return opts


class RayPlacement:
    """The server's link to Ray: connects on the first placed load (starting a local Ray when
    no address is set), deploys one application per loaded version and shuts down what it
    started."""

    def __init__(self, address: str | None = None, *, namespace: str = "inhouse", num_cpus: int | None = None,
                 object_store_mb: int = 128, retries: int = 2) -> None:
        self.address = address
        self.namespace = namespace
        self._num_cpus = num_cpus
        self._object_store_mb = object_store_mb
        self.retries = retries
        self._lock = threading.Lock()
        self._connected = False
        self._count = itertools.count(1)
        self._token = uuid.uuid4().hex[:8]  # several servers may share one cluster and namespace

    def backend_for(self, spec: ModelSpec) -> RayServeBackend | None:
        return RayServeBackend(self) if placed_on_ray(spec) else None

    def copies(self, spec: ModelSpec) -> int:
        return 1  # with Ray, one server process: a model loaded here is its only copy

    def connect(self) -> None:
        with self._lock:
            if self._connected:
                return
            # a Ray call after this server left its cluster (a handle's background thread) would
            # otherwise start a whole local Ray of its own
            os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
            try:
                import ray
                from ray import serve
            except ImportError as err:
                raise MissingExtraError(
                    f"Ray placement needs Ray Serve, which is not installed ({err.name}); install it with: "
                    "pip install 'inhouse[ray]'."
                ) from None
            if not ray.is_initialized():
                if self.address is None:
                    ray.init(namespace=self.namespace, num_cpus=self._num_cpus, include_dashboard=False,
                             object_store_memory=self._object_store_mb * 2**20, log_to_driver=False,
                             configure_logging=False)
                else:
                    ray.init(address=self.address, namespace=self.namespace, log_to_driver=False,
                             configure_logging=False)
            serve.start(proxy_location="Disabled")  # requests arrive through this server, never Serve's HTTP
            self._connected = True
            log.info("connected to Ray", extra={"address": self.address or "local"})

    def app_name(self, spec: ModelSpec, version: int) -> str:
        return f"{self.namespace}.{spec.name}.v{version}.{self._token}-{next(self._count)}"

    def close(self) -> None:
        """Leave Ray; a local Ray started here stops with it."""
        with self._lock:
            if not self._connected:
                return
            import ray
            from ray import serve

            if self.address is None:
                serve.shutdown()  # type: ignore[no-untyped-call]  # the local Ray is this server's alone
            ray.shutdown()
            self._connected = False


class RayServeBackend:
    """Loads a version by deploying it: ``serve.run`` of an ``InhouseReplica`` application,
    blocking (on the manager's load thread) until every replica has loaded the model."""

    name = "ray"

    def __init__(self, placement: RayPlacement) -> None:
        self._placement = placement

    def load(self, ctx: LoadContext) -> RayServeModel:
        self._placement.connect()
        from ray import serve

        spec = ctx.spec
        version = int(ctx.version_dir.name) if ctx.version_dir.name.isdigit() else 1
        app = self._placement.app_name(spec, version)
        options = {k: v for k, v in ctx.options.items() if isinstance(v, str | int | float | bool | Path | None)}
        deployment = serve.deployment(name=spec.name, **deployment_options(spec))(InhouseReplica)
        try:
            handle = serve.run(deployment.bind(str(ctx.model_dir), str(ctx.version_dir), spec.model_dump(),
                                               options), name=app, route_prefix=None)
        except Exception as exc:
            _delete(app)
            text = str(exc).strip()
            why = text.splitlines()[-1][:400] if text else type(exc).__name__
            raise ModelLoadError(f"Ray Serve could not deploy model '{spec.name}' version {version}: {why}; "
                                 "check that every Ray node has inhouse installed and can read the "
                                 "model repository at the same path.") from None
        meta: dict[str, Any] = handle.options(method_name="metadata").remote().result(timeout_s=60)
        if "error" in meta:
            _delete(app)
            _unpack(meta["error"])
        return RayServeModel(app, handle, meta, spec, self._placement.retries)


def _delete(app: str) -> None:
    from ray import serve

    try:
        serve.delete(app)
    except Exception:
        log.exception("deleting a Ray Serve application failed", extra={"application": app})


class RayServeModel:
    """The front door's view of a placed version: its tensors (as a replica reported them),
    blocking ``predict`` for warm-up, and ``make_scheduler`` for the request path. Closing it
    deletes the application (its replicas finish what they hold, then stop)."""

    def __init__(self, app: str, handle: Any, meta: dict[str, Any], spec: ModelSpec, retries: int) -> None:
        self.app = app
        self.platform = f"ray:{meta['platform']}"
        self.inputs = [TensorSpec.model_validate(t) for t in meta["inputs"]]
        self.outputs = [TensorSpec.model_validate(t) for t in meta["outputs"]]
        self._handle = handle
        self._predict = handle.options(method_name="predict")
        self._spec = spec
        self._retries = retries

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        return _unpack(self._predict.remote(inputs, outputs, None).result(timeout_s=60))

    def make_scheduler(self) -> Scheduler:
        return RayServeScheduler(self._predict, self._spec, self._retries)

    def close(self) -> None:
        # the handles share one router, which keeps pushing metrics from a thread of its own
        # until it is shut down (and after the server left Ray, that thread would fail)
        try:
            self._handle.shutdown()
        except Exception:
            log.debug("a Ray Serve handle did not shut down cleanly", exc_info=True)
        _delete(self.app)


class RayServeScheduler:
    """The request path of a placed version: a bounded count of requests in flight (429 beyond
    ``batching.max_queue_size``), the request's deadline, and a resend to another replica when the
    one holding a request died (model calls have no side effects, so a resend is safe); batching
    happens in the replicas."""

    def __init__(self, handle: Any, spec: ModelSpec, retries: int) -> None:
        from ray import exceptions as rex

        self._handle = handle
        self._spec = spec
        self._retries = retries
        self._lost = (rex.ActorDiedError, rex.ActorUnavailableError, rex.RayActorError)
        self._task_error = rex.RayTaskError
        self._inflight = 0

    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *,
                     priority: int | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        limit = self._spec.batching.max_queue_size
        if self._inflight >= limit:
            raise QueueFullError(f"Model '{self._spec.name}' has {limit} requests in flight on Ray; retry shortly.",
                                 headers={"Retry-After": "1"})
        if timeout_s is None and self._spec.batching.default_timeout_ms is not None:
            timeout_s = self._spec.batching.default_timeout_ms / 1000
        self._inflight += 1
        try:
            if timeout_s is None:
                return await self._call(inputs, outputs, None)
            try:
                return await asyncio.wait_for(self._call(inputs, outputs, timeout_s), timeout_s)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"Model '{self._spec.name}' did not answer within {timeout_s * 1000:g} ms on Ray.") from None
        finally:
            self._inflight -= 1

    async def _call(self, inputs: dict[str, np.ndarray], outputs: list[str] | None,
                    timeout_s: float | None) -> dict[str, np.ndarray]:
        for attempt in itertools.count():
            try:
                result = await self._handle.remote(inputs, outputs, timeout_s)
            except self._lost:
                if attempt >= self._retries:
                    raise InferenceError(f"The Ray replicas of model '{self._spec.name}' died while running the "
                                         "request; retry.") from None
                log.warning("a Ray replica died under a request; sending it again",
                            extra={"model": self._spec.name, "attempt": attempt + 1})
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            except self._task_error as err:
                log.error("Ray replica call failed", extra={"model": self._spec.name, "error": str(err)[:400]})
                raise InferenceError(f"Model '{self._spec.name}' failed on its Ray replica.") from None
            return _unpack(result)
        raise AssertionError("unreachable")  # pragma: no cover

    def queue_depth(self) -> int:
        return self._inflight

    async def close(self) -> None:
        return None


__all__ = ["InhouseReplica", "RayPlacement", "RayServeBackend", "RayServeModel", "RayServeScheduler",
           "deployment_options", "placed_on_ray"]
