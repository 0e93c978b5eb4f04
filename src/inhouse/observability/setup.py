"""Wires metrics, access logs and tracing into one server: the only module that knows all
the pieces. ``InhouseServer`` builds one ``Observability`` and registers its front end."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from inhouse.core.dataplane import DataPlane
from inhouse.core.manager import ModelManager
from inhouse.observability.access import HttpMetrics, ObservabilityMiddleware
from inhouse.observability.collectors import GpuCollector, ModelCollector, ProcessCollector
from inhouse.observability.endpoint import MetricsPortError, MetricsServer
from inhouse.observability.metrics import LifecycleRecorder, Metrics
from inhouse.observability.observer import RequestObserver
from inhouse.settings import ServerSettings

if TYPE_CHECKING:
    from inhouse.observability.grpc import GrpcObservabilityInterceptor
    from inhouse.observability.tracing import Tracer
    from inhouse.server import InhouseServer

log = logging.getLogger(__name__)


class Observability:
    def __init__(self, settings: ServerSettings, manager: ModelManager, dataplane: DataPlane, app: FastAPI,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.registry = self.metrics.registry
        self.registry.register(ModelCollector(manager))
        self.registry.register(ProcessCollector())
        self.gpu = GpuCollector()
        self.registry.register(self.gpu)
        manager.recorders = self.metrics
        manager.listeners.append(LifecycleRecorder(self.metrics, _failure_code(manager)))
        dataplane.observer = RequestObserver(self.metrics)
        dataplane.statistics = self.metrics.statistics
        self.tracer: Tracer | None = None
        if settings.otlp_endpoint:
            from inhouse.observability.tracing import Tracer, TracingUnavailableError
            from inhouse.server import StartupError

            try:
                self.tracer = Tracer(settings.otlp_endpoint, settings.otel_service_name, settings.trace_sample_ratio)
            except TracingUnavailableError as err:
                raise StartupError(str(err)) from None
        self.http_metrics = HttpMetrics(self.metrics)
        app.state.metrics_registry = self.registry
        # added after build_app: outermost, so even requests the security layer rejects are logged
        app.add_middleware(ObservabilityMiddleware, http_metrics=self.http_metrics, tracer=self.tracer,
                           access_log_enabled=settings.access_log, log_client_address=settings.log_client_address)
        self.metrics_server: MetricsServer | None = None
        self._grpc: GrpcObservabilityInterceptor | None = None

    def grpc_interceptor(self) -> GrpcObservabilityInterceptor:
        """The grpc.aio server interceptor (``grpc_server_*`` metrics, request context, access log)."""
        if self._grpc is None:
            from inhouse.observability.grpc import GrpcObservabilityInterceptor

            self._grpc = GrpcObservabilityInterceptor(self.metrics.grpc, access_log_enabled=self.settings.access_log)
        return self._grpc

    async def front_end(self, server: InhouseServer) -> Callable[[], Awaitable[None]]:
        """Starts the dedicated metrics port if configured; returns the stopper."""
        s = self.settings
        if s.metrics_port is not None:
            from inhouse.server import StartupError

            try:
                self.metrics_server = MetricsServer(self.registry, s.metrics_host or s.host, s.metrics_port)
            except MetricsPortError as err:
                raise StartupError(str(err)) from None
            log.info("metrics listening", extra={"port": self.metrics_server.port})

        async def stop() -> None:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            if self.tracer is not None:
                self.tracer.shutdown()

        return stop


def _failure_code(manager: ModelManager) -> Callable[[str, int | None], int | None]:
    def code(model: str, version: int | None) -> int | None:
        for e in manager.index():
            if e.name == model and e.version == version:
                return e.code
        return None

    return code

