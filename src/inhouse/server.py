"""One inhouse process: the HTTP front end (and, when enabled, gRPC) over one data plane."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inhouse.core.dataplane import DataPlane, ServerState
from inhouse.core.heap import HeapSettler
from inhouse.core.manager import ModelManager
from inhouse.core.repository import LinkedModel, ModelRepository, single_model
from inhouse.core.response_cache import CachePolicy, ResponseCache
from inhouse.demo import ensure_demo_repository
from inhouse.discovery import SERVICE_TYPE, Advertiser, DiscoveryUnavailableError, require_discovery
from inhouse.errors import InhouseError
from inhouse.listen import ListenError
from inhouse.llm.images import ImageFetcher
from inhouse.llm.service import LLMService
from inhouse.observability.setup import Observability
from inhouse.observability.tracing import TracingUnavailableError
from inhouse.security.gate import SecurityGate
from inhouse.security.paths import check_model_source
from inhouse.security.ratelimit import SharedRateLimiter
from inhouse.security.serving import ModelKeyError, exposure_problem, model_keyring, start_security
from inhouse.settings import ServerSettings
from inhouse.transports.http.app import build_app
from inhouse.transports.http.client_limits import limited
from inhouse.transports.http.fast_path import fast_protocol
from inhouse.transports.http.infer_entry import InferEntry
from inhouse.transports.http.metrics_app import build_metrics_app
from inhouse.transports.tls import TlsConfigError, TlsMaterial, load_tls, server_context

if TYPE_CHECKING:
    from inhouse.core.ray_serve import RayPlacement
    from inhouse.transports.grpc.server import GrpcFrontEnd
    from inhouse.workers.link import WorkerLink
    from inhouse.workers.placement import WorkerPlacement

log = logging.getLogger(__name__)

Stopper = Callable[[], Awaitable[None]]


class StartupError(Exception):
    """The server cannot start; the message says why and what to do."""


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our own event loop: signals are ours to handle, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int, what: str, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP; without it every small response waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if reuse_port:  # worker processes: each listens, the kernel spreads connections over them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise StartupError(
            f"Cannot listen for {what} on {host}:{port}: {err.strerror}. Another process may use the "
            f"port; stop it or choose another port (--{what.lower()}-port)."
        ) from None
    sock.set_inheritable(True)
    return sock


class InhouseServer:
    """One process, built here in one place and in dependency order: settings → security checks
    (TLS, exposure, model keyring) → data plane (repository, manager, data plane) → security gate
    (it reads model specs from the manager) → LLM service → observability → front ends (HTTP app
    and infer entry, gRPC). Each front end is handed the services it uses, nothing more."""

    def __init__(self, settings: ServerSettings, repo_path: Path | None = None, *,
                 worker: WorkerLink | None = None) -> None:
        self.settings = settings
        self._worker = worker  # one of several worker processes (inhouse/workers/), or None

        # security checks: refuse a misconfigured or exposed start before anything is opened
        try:
            self.tls: TlsMaterial | None = load_tls(settings)
        except TlsConfigError as err:
            raise StartupError(str(err)) from None
        exposure = exposure_problem(settings)
        if exposure is not None:
            raise StartupError(exposure)
        try:
            keyring = model_keyring(settings)
        except ModelKeyError as err:
            raise StartupError(str(err)) from None

        # data plane
        single = self._single_model(settings)
        if repo_path is None and single is not None and settings.repo is None:
            repo_path = settings.data_dir / "no-repository"  # never created: the one model is linked
        elif repo_path is None:
            repo_path = settings.repo if settings.repo is not None else ensure_demo_repository(settings.data_dir)
        if single is None and not repo_path.is_dir():
            raise StartupError(f"Model repository {repo_path} does not exist or is not a folder.")
        self.repository = ModelRepository(repo_path)
        self._watch_root = self.repository.root
        if single is not None:
            try:
                self.repository.link(*single)
            except InhouseError as err:
                raise StartupError(f"MODEL_PATH / --model: {err.message}") from None
            if not repo_path.is_dir():
                self._watch_root = single[1].folder
        self.manager = ModelManager(
            self.repository,
            decryptor=keyring,
            backend_options={"onnx_spinning": settings.onnx_spinning, "llama_server": settings.llama_server,
                             "vllm": settings.vllm, "vllm_command": settings.vllm_command},
            drain_timeout_s=settings.drain_timeout_s,
            load_timeout_s=settings.load_timeout_s,
            placement=self._ray_placement(settings) or self._worker_placement(settings, worker),
        )
        self._heap: HeapSettler | None = None
        if settings.gc_freeze:
            self._heap = HeapSettler()
            self.manager.listeners.append(self._heap)
        self.state = ServerState()
        # a load request's 'source' may only name the repository or the configured model folders
        check_source = partial(check_model_source, allowed=[self.repository.root, *settings.model_dirs])
        self.dataplane: DataPlane
        if worker is None:
            self.dataplane = DataPlane(self.manager, self.state, check_source=check_source)
        else:
            from inhouse.workers.link import WorkerDataPlane

            self.dataplane = WorkerDataPlane(self.manager, worker, self.state, check_source=check_source)

        limiter = None
        if worker is not None and worker.count > 1:  # a key's rate holds for the server, not per worker
            limiter = SharedRateLimiter(worker.folder / "rates.bin", worker.index, worker.count)
        self.security = SecurityGate(settings, self.manager, limiter)
        try:
            fetcher = ImageFetcher(settings.image_url_allow) if settings.image_url_allow else None
            self.llm = LLMService(self.manager, max_pending=settings.llm_max_pending, timeout_s=settings.llm_timeout_s,
                                  image_fetcher=fetcher)
            try:
                self.observability = Observability(settings, self.manager, self.dataplane)
            except TracingUnavailableError as err:
                raise StartupError(str(err)) from None
            if worker is not None:
                worker.registry = self.observability.registry
                self.observability.serve_metrics_from(worker.render_metrics, worker.metric_families)

            self.cache = self._response_cache(settings)

            # front ends
            http = self.observability.http
            self.app = build_app(self.dataplane, settings, llm=self.llm, gate=self.security, observability=http)
            # the hot routes (v2 infer) answered in front of the app, with the same security and observability
            self.asgi = InferEntry(
                self.app, dataplane=self.dataplane, gate=self.security, max_request_bytes=settings.max_request_bytes,
                gzip_min_bytes=settings.gzip_min_bytes, http_metrics=http.http_metrics, tracer=http.tracer,
                access_log_enabled=http.access_log, log_client_address=http.log_client_address,
                access_log_sample=http.access_log_sample)
            self._grpc = self._grpc_front_end() if settings.grpc.enabled else None
        except BaseException:
            self.security.close()  # it opened the key store and audit log
            raise
        self.http_port: int = settings.http_port
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None  # the dedicated one, once it listens

        self._uvicorn: _EmbeddedUvicorn | None = None
        self._advertiser: Advertiser | None = None
        if settings.discovery:
            try:
                require_discovery()
            except DiscoveryUnavailableError as err:
                raise StartupError(str(err)) from None
        self._tasks: list[asyncio.Task[None]] = []
        self._stoppers: list[Stopper] = []
        self._stopped = asyncio.Event()

    def _response_cache(self, settings: ServerSettings) -> ResponseCache:
        """One cache for v2 infer and the LLM APIs; it holds nothing until a model opts in
        (``response_cache`` in model.yaml, or ``cache.enabled``)."""
        try:
            cache = ResponseCache(CachePolicy(**settings.cache.model_dump()), recorder=self.observability.metrics)
        except ModuleNotFoundError as err:
            raise StartupError(f"cache.redis_url needs the redis package ({err.name} is missing): "
                               "pip install 'inhouse[redis]'.") from None
        self.dataplane.cache = cache
        self.llm.cache = cache
        self.manager.listeners.append(cache)
        return cache

    def _worker_placement(self, settings: ServerSettings, worker: WorkerLink | None) -> WorkerPlacement | None:
        """With several workers, models placed on one of them load as stand-ins in the others."""
        if worker is None or worker.count < 2:
            return None
        from inhouse.workers.placement import WorkerPlacement

        return WorkerPlacement(self.repository, worker.folder, worker.index, worker.count,
                               settings.placement_one_above_mb)

    @staticmethod
    def _ray_placement(settings: ServerSettings) -> RayPlacement | None:
        """Ray Serve placement when the settings ask for it; Ray itself is imported on the first
        placed load, so a missing extra fails that load with its install command."""
        if settings.ray is None:
            return None
        from inhouse.core.ray_serve import RayPlacement

        r = settings.ray
        return RayPlacement(r.address, namespace=r.namespace, num_cpus=r.num_cpus,
                            object_store_mb=r.object_store_mb, retries=r.retries)

    @staticmethod
    def _single_model(settings: ServerSettings) -> tuple[str, LinkedModel] | None:
        if settings.model_path is None:
            return None
        try:
            return single_model(settings.model_path)
        except InhouseError as err:
            raise StartupError(f"MODEL_PATH / --model: {err.message}") from None

    def _grpc_front_end(self) -> GrpcFrontEnd | None:
        try:
            # lazy: an environment missing the grpc packages still serves HTTP
            from inhouse.transports.grpc.server import GrpcFrontEnd
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith(("grpc", "google")):
                raise
            log.warning("gRPC is off: its packages are missing from this environment (reinstall inhouse), "
                        "or set grpc.enabled: false to silence this", extra={"missing": err.name})
            return None
        return GrpcFrontEnd(self.settings, self.tls, self.dataplane, self.llm, self.security,
                            self.observability.metrics.grpc, reuse_port=self._worker is not None)

    @property
    def grpc_target(self) -> str | None:
        """host:port for gRPC clients, once the gRPC front end listens."""
        if self.grpc_port is None:
            return None
        host = self.settings.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://{host}:{self.http_port}"

    async def start(self) -> None:
        """Bind, start serving (live, not yet ready), load the start-up models, become ready."""
        sock = bind_socket(self.settings.host, self.settings.http_port, "HTTP", reuse_port=self._worker is not None)
        self.http_port = sock.getsockname()[1]
        self._uvicorn = _EmbeddedUvicorn(self._uvicorn_config(self.asgi, **self._uvicorn_http()))
        self._tasks.append(asyncio.create_task(self._uvicorn.serve(sockets=[sock])))
        while not self._uvicorn.started:
            if self._tasks[0].done():
                self._tasks[0].result()
                raise StartupError("The HTTP server stopped during start-up.")
            await asyncio.sleep(0.01)
        try:
            await self._start_front_ends()
        except ListenError as err:
            await self.stop()
            raise StartupError(str(err)) from None
        except BaseException:
            await self.stop()
            raise
        log.info("listening", extra={"url": self.http_url, "repository": str(self.repository.root)})
        log.info("console", extra={"url": f"{self.http_url}/console"})
        await self._initial_load()
        if self._worker is not None:
            await self._worker.sync()  # the loads and unloads made while this worker was not running
        if self._heap is not None:
            self._heap.settle_now()  # before ready: the first requests meet a frozen heap
        self.state.started = True
        if self.settings.discovery and (self._worker is None or self._worker.index == 0):
            await self._advertise()  # one announcement per server, not one per worker process
        # with workers, worker 0 polls for the server and applies what it finds in every worker
        if self.settings.poll and (self._worker is None or self._worker.index == 0):
            self._tasks.append(asyncio.create_task(self._poll()))
        log.info("ready", extra={"models": sorted(self.manager.serving())})

    async def _advertise(self) -> None:
        """Announce this server on the LAN (mDNS) once it is ready; a failure is logged, not fatal:
        clients can still be given the address."""
        s = self.settings
        advertiser = Advertiser(host=s.host, http_port=self.http_port, grpc_port=self.grpc_port,
                                tls=s.tls_cert is not None, auth=s.auth, interfaces=s.discovery_interfaces)
        try:
            await advertiser.start()
        except Exception as exc:
            log.warning("LAN discovery: could not advertise", extra={"reason": f"{type(exc).__name__}: {exc}"})
            return
        self._advertiser = advertiser
        log.info("advertised on the LAN", extra={"service": SERVICE_TYPE, "url": advertiser.url})

    async def _start_front_ends(self) -> None:
        """Beside HTTP: gRPC, the audit maintenance, the metrics port; each returns its stopper."""
        if self._grpc is not None:
            self.grpc_port = await self._grpc.start()
            self._stoppers.append(self._grpc.stop)
        self._stoppers.append(await start_security(self.security, self.settings.audit_retention_days))
        self._stoppers.append(await self.observability.start())
        if self.settings.metrics_port is not None:
            self._stoppers.append(await self._serve_metrics_port(self.settings.metrics_port))

    def _uvicorn_config(self, app: Any, **extra: Any) -> uvicorn.Config:
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off",
            timeout_keep_alive=30, server_header=False, date_header=False,
            proxy_headers=False,  # X-Forwarded-For is the security layer's, from trusted_proxies only
            # on stop: no new connections; in-flight requests get drain_timeout_s to finish
            timeout_graceful_shutdown=self.settings.drain_timeout_s,  # type: ignore[arg-type]  # a float works
            **extra,
            **self._uvicorn_tls(),
        )
        if self.tls is not None:
            config.load()
            config.ssl = server_context(self.tls)  # our context: TLS >= tls_min_version, client certs verified
        return config

    async def _serve_metrics_port(self, port: int) -> Stopper:
        """The dedicated metrics port: a second uvicorn server in this loop, over an app with the
        main port's security middleware and TLS (transports/http/metrics_app.py)."""
        s = self.settings
        sock = bind_socket(s.metrics_host or s.host, port, "metrics", reuse_port=self._worker is not None)
        self.metrics_port = sock.getsockname()[1]
        app = build_metrics_app(gate=self.security, observability=self.observability.http,
                                max_request_bytes=s.max_request_bytes)
        server = _EmbeddedUvicorn(self._uvicorn_config(app, http=self._limited(HttpToolsProtocol)))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
                raise StartupError("The metrics server stopped during start-up.")
            await asyncio.sleep(0.01)
        log.info("metrics listening", extra={"port": self.metrics_port})

        async def stop() -> None:
            server.should_exit = True
            await task

        return stop

    def _uvicorn_http(self) -> dict[str, Any]:
        """v2 infer answered on the connection (transports/http/fast_path.py), unless turned off;
        either way with the slow-client and header limits (transports/http/client_limits.py)."""
        base: type[HttpToolsProtocol] = (fast_protocol(self.asgi, self.settings.max_request_bytes)
                                         if self.settings.http_fast_path else HttpToolsProtocol)
        return {"http": self._limited(base)}

    def _limited(self, protocol: type[HttpToolsProtocol]) -> type[HttpToolsProtocol]:
        s = self.settings
        return limited(protocol, header_timeout_s=s.header_timeout_s, body_timeout_s=s.body_timeout_s,
                       max_header_bytes=s.max_header_bytes)

    def _uvicorn_tls(self) -> dict[str, Any]:
        tls = self.tls
        if tls is None:
            return {}
        return {
            "ssl_certfile": str(tls.cert_path), "ssl_keyfile": str(tls.key_path),
            "ssl_ca_certs": str(tls.client_ca_path) if tls.client_ca_path else None,
            "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.mutual else ssl.CERT_NONE,
        }

    async def _initial_load(self) -> None:
        names = self.settings.load_names()
        available = self.repository.model_names()
        if names == "none":
            self.manager.park(available)
            return
        if names == "all":
            names = available
        else:
            unknown = [n for n in names if n not in available]
            if unknown:
                raise StartupError(
                    f"--load names {unknown}, which are not in {self.repository.root} "
                    f"(models there: {', '.join(available) or 'none'})."
                )
        self.manager.park([n for n in available if n not in names])  # --poll leaves these alone
        results = await self.manager.load_many(list(names))
        for name, err in results.items():
            if err is not None:
                log.error("model failed to load; the server keeps serving the others",
                          extra={"model": name, "code": err.code, "reason": err.message})

    async def _poll(self) -> None:
        """Reconcile with the repository whenever it changes (watchfiles), and at least every
        poll interval (network filesystems do not always deliver change events)."""
        import watchfiles

        interval = self.settings.poll_interval_s
        stop = asyncio.Event()
        watcher = watchfiles.awatch(self._watch_root, stop_event=stop, debounce=200,
                                    rust_timeout=int(interval * 1000), yield_on_timeout=True,
                                    recursive=True)
        try:
            async for _ in watcher:
                try:
                    await self.manager.reconcile(self.dataplane.load_model, self.dataplane.unload_model)
                except InhouseError as err:
                    log.error("repository poll failed", extra={"code": err.code, "reason": err.message})
                except Exception:
                    log.exception("repository poll failed")
        finally:
            stop.set()

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        self.state.shutting_down = True
        if self._advertiser is not None:
            advertiser, self._advertiser = self._advertiser, None
            with contextlib.suppress(Exception):
                await advertiser.stop()  # goodbye packets first: clients stop listing it
        for stopper in reversed(self._stoppers):
            with contextlib.suppress(Exception):
                await stopper()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        for t in self._tasks[1:]:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # after the drain: the requests answered while draining are audited too
        await self.security.aclose()
        self.cache.stopping()
        await self.manager.close()
        with contextlib.suppress(Exception):
            await self.cache.close()
        if self._heap is not None:
            self._heap.close()
            gc.unfreeze()  # an embedding process keeps running: its objects are collectable again
        self._stopped.set()

    async def run(self) -> None:
        """Start, serve until asked to stop (SIGINT / SIGTERM), stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self.wait_stopped()
        finally:
            await self.stop()
