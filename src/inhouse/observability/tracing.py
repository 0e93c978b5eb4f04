"""Optional OpenTelemetry tracing (``pip install 'inhouse[otel]'``), exported over OTLP/HTTP.

Per request one SERVER span, child of the caller's ``traceparent``, with children for the
phases: ``receive`` (parse and validate), ``queue``, ``compute`` (with the batch size) and
``respond``. Phase spans are built from timestamps the request already records, so the hot
path does no tracing work; with tracing off nothing here is imported."""

from __future__ import annotations

import logging
from typing import Any

from inhouse.observability.context import RequestContext

log = logging.getLogger(__name__)


class TracingUnavailableError(Exception):
    """OpenTelemetry is not installed."""


class Tracer:
    def __init__(self, endpoint: str, service_name: str = "inhouse", sample_ratio: float = 1.0,
                 resource_attributes: dict[str, str] | None = None) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context
        except ImportError as err:
            raise TracingUnavailableError(
                f"otlp_endpoint is set but OpenTelemetry is not installed ({err.name}); "
                "install it with pip install 'inhouse[otel]' or unset otlp_endpoint."
            ) from None
        from inhouse import __version__

        if not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        resource = Resource.create({"service.name": service_name, "service.version": __version__,
                                    **(resource_attributes or {})})
        # Our own provider, not the global one: several servers in a process stay separate.
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("inhouse", __version__)
        self._ot: dict[str, Any] = {"NonRecordingSpan": NonRecordingSpan, "SpanContext": SpanContext,
                                    "SpanKind": SpanKind, "TraceFlags": TraceFlags,
                                    "set_span_in_context": set_span_in_context}
        self.endpoint = endpoint

    def start_request(self, ctx: RequestContext, name: str) -> Any:
        ot = self._ot
        parent = None
        if ctx.parent_span_id is not None:
            remote = ot["SpanContext"](int(ctx.trace_id, 16), int(ctx.parent_span_id, 16), is_remote=True,
                                       trace_flags=ot["TraceFlags"](1 if ctx.sampled else 0))
            parent = ot["set_span_in_context"](ot["NonRecordingSpan"](remote))
        span = self._tracer.start_span(name, context=parent, kind=ot["SpanKind"].SERVER, start_time=ctx.start_ns)
        sc = span.get_span_context()
        if sc.is_valid:  # what traceparent returns to the client
            ctx.trace_id, ctx.span_id = f"{sc.trace_id:032x}", f"{sc.span_id:016x}"
            ctx.sampled = bool(sc.trace_flags & 1)
        return span

    def end_request(self, span: Any, ctx: RequestContext, route: str, status: int) -> None:
        import time

        end = time.time_ns()
        if not span.is_recording():
            span.end(end_time=end)
            return
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("inhouse.request_id", ctx.request_id)
        if ctx.model is not None:
            span.set_attribute("inhouse.model", ctx.model)
            span.set_attribute("inhouse.model_version", str(ctx.version))
        if ctx.code is not None:
            span.set_attribute("inhouse.error_code", ctx.code)
            if status >= 500:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, f"inhouse error {ctx.code}"))
        self._phases(span, ctx, end)
        span.end(end_time=end)

    def _phases(self, span: Any, ctx: RequestContext, end: int) -> None:
        if ctx.compute_s is None or not ctx.compute_end_ns:
            return
        parent = self._ot["set_span_in_context"](span)
        compute_start = ctx.compute_end_ns - int(ctx.compute_s * 1e9)
        queue_start = compute_start - int((ctx.queue_s or 0.0) * 1e9)
        phases = [("receive", ctx.start_ns, queue_start, {}),
                  ("queue", queue_start, compute_start, {}),
                  ("compute", compute_start, ctx.compute_end_ns, {"inhouse.batch_size": ctx.batch_size}),
                  ("respond", ctx.compute_end_ns, end, {})]
        for name, t0, t1, attrs in phases:
            child = self._tracer.start_span(name, context=parent, start_time=max(ctx.start_ns, t0), attributes=attrs)
            child.end(end_time=max(t0, min(t1, end)))

    def shutdown(self) -> None:
        try:
            self._provider.shutdown()  # flushes what is still queued
        except Exception:
            log.exception("flushing traces failed")
