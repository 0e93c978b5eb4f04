"""What Prometheus scrapes: ``GET /metrics``, on the HTTP port and on the dedicated metrics port."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from starlette.requests import Request
from starlette.responses import Response

from inhouse.security.pipeline import Guard, guarded


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for (Prometheus text or OpenMetrics)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


Exposition = Callable[[str | None], Awaitable[tuple[bytes, str]]]
"""Renders the metrics of more than this registry (worker processes: the sum over all of them)."""
Families = Callable[[], Awaitable[list[Metric]]]
"""The metric families the console charts, of more than this registry (the same sum)."""


def build_metrics_router(registry: CollectorRegistry, source: Exposition | None = None) -> APIRouter:
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", summary="Prometheus metrics")
    @guarded(Guard("metrics", "metrics"))
    async def metrics(request: Request) -> Response:
        accept = request.headers.get("accept")
        body, content_type = await source(accept) if source is not None else render(registry, accept)
        return Response(body, media_type=None, headers={"Content-Type": content_type})

    return router
