"""The data plane's observer: metrics for every inference, and the request context (model,
version, error code) that the access log and the trace report."""

from __future__ import annotations

from inhouse.errors import InhouseError
from inhouse.observability.context import current
from inhouse.observability.metrics import Metrics


class RequestObserver:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def infer_done(self, model: str, version: int, seconds: float) -> None:
        self._metrics.infer_done(model, version, seconds)
        ctx = current()
        if ctx is not None:
            ctx.model, ctx.version = model, version

    def infer_failed(self, model: str, version: int | None, error: BaseException,
                     seconds: float | None) -> None:
        self._metrics.infer_failed(model, version, error, seconds)
        ctx = current()
        if ctx is not None:
            ctx.model, ctx.version = model, version
            ctx.code = error.code if isinstance(error, InhouseError) else 9000
