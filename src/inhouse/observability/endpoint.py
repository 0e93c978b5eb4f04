"""Where Prometheus scrapes: ``GET /metrics`` on the HTTP port, and optionally a dedicated port."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response

from inhouse.listen import ListenError
from inhouse.security.pipeline import Guard, guarded


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for (Prometheus text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def build_metrics_router(registry: CollectorRegistry) -> APIRouter:
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", summary="Prometheus metrics")
    @guarded(Guard("metrics", "metrics"))
    async def metrics(request: Request) -> Response:
        body, content_type = render(registry, request.headers.get("accept"))
        return Response(body, media_type=None, headers={"Content-Type": content_type})

    return router


class MetricsPortError(ListenError):
    """The dedicated metrics port cannot be opened."""


class MetricsServer:
    """prometheus_client's own small HTTP server on its own thread: scrapes never queue
    behind inference traffic on the event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._httpd: Any
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as err:
            raise MetricsPortError(
                f"Cannot listen for metrics on {host}:{port}: {err.strerror}. Another process may use the "
                "port; stop it or choose another port (--metrics-port, INHOUSE_METRICS_PORT)."
            ) from None
        self.port: int = self._httpd.server_port

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if isinstance(self._thread, threading.Thread):
            self._thread.join(5)
