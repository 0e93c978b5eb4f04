"""The dedicated metrics port's app: ``/metrics`` alone, behind the same security and
observability middleware as the main port, so the second port is no side door (API key with the
``metrics`` scope under auth, the allow-list, the audit log; TLS is the server's for both)."""

from __future__ import annotations

from fastapi import FastAPI

from inhouse.observability.access import ObservabilityMiddleware
from inhouse.observability.endpoint import build_metrics_router
from inhouse.observability.setup import HttpObservability
from inhouse.protocols.errors import ErrorResponses
from inhouse.security.gate import SecurityGate
from inhouse.transports.http.security import SecurityMiddleware


def build_metrics_app(*, gate: SecurityGate, observability: HttpObservability, max_request_bytes: int) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(build_metrics_router(observability.registry, observability.exposition))
    app.add_middleware(ErrorResponses)
    app.add_middleware(SecurityMiddleware, gate=gate, max_request_bytes=max_request_bytes)
    # outermost, as on the main port: refused scrapes are measured and logged too
    app.add_middleware(ObservabilityMiddleware, http_metrics=observability.http_metrics,
                       tracer=observability.tracer, access_log_enabled=observability.access_log,
                       log_client_address=observability.log_client_address,
                       access_log_sample=observability.access_log_sample)
    return app
