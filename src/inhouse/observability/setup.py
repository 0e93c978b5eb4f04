"""Wires metrics, access logs and tracing into one server: the only module that knows all
the pieces. The server builds one ``Observability`` before its front ends and hands each of
them the part it uses (``http`` for the HTTP app and the infer entry, ``metrics.grpc`` for gRPC)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry

from inhouse.core.dataplane import DataPlane
from inhouse.core.manager import ModelManager
from inhouse.logs import flush_json_lines
from inhouse.observability.access import HttpMetrics
from inhouse.observability.collectors import EngineCollector, GpuCollector, ModelCollector, ProcessCollector
from inhouse.observability.endpoint import Exposition, Families
from inhouse.observability.metrics import LifecycleRecorder, Metrics
from inhouse.observability.observer import RequestObserver
from inhouse.observability.tracing import Tracer
from inhouse.settings import ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HttpObservability:
    """What an HTTP front end needs to be observed: the registry ``/metrics`` serves, request
    metrics, tracing and the access-log switches."""

    registry: CollectorRegistry
    http_metrics: HttpMetrics
    tracer: Tracer | None
    access_log: bool
    log_client_address: bool
    access_log_sample: float = 1.0
    exposition: Exposition | None = None  # what /metrics serves instead of the registry alone
    families: Families | None = None  # what the console charts instead of the registry alone


class Observability:
    """Raises ``TracingUnavailableError`` when tracing is asked for and cannot run."""

    def __init__(self, settings: ServerSettings, manager: ModelManager, dataplane: DataPlane,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.registry = self.metrics.registry
        self.registry.register(ModelCollector(manager))
        self.registry.register(EngineCollector(manager))
        self.registry.register(ProcessCollector())
        self.gpu = GpuCollector()
        self.registry.register(self.gpu)
        manager.recorders = self.metrics
        manager.listeners.append(LifecycleRecorder(self.metrics, _failure_code(manager)))
        dataplane.observer = RequestObserver(self.metrics)
        dataplane.statistics = self.metrics.statistics
        self.tracer: Tracer | None = None
        if settings.otlp_endpoint:
            self.tracer = Tracer(settings.otlp_endpoint, settings.otel_service_name, settings.trace_sample_ratio)
        self.http_metrics = HttpMetrics(self.metrics)
        self.http = HttpObservability(self.registry, self.http_metrics, self.tracer, settings.access_log,
                                      settings.log_client_address, settings.access_log_sample)

    def serve_metrics_from(self, exposition: Exposition, families: Families) -> None:
        """/metrics renders ``exposition`` and the console charts ``families`` (worker processes:
        every worker's metrics added up)."""
        self.http = replace(self.http, exposition=exposition, families=families)

    async def start(self) -> Callable[[], Awaitable[None]]:
        """Returns the stopper (the dedicated metrics port is the server's: it serves an app
        behind the security middleware, transports/http/metrics_app.py)."""

        async def stop() -> None:
            flush_json_lines()  # access-log lines of the last event-loop turn
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
