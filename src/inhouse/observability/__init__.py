"""Observability: Prometheus metrics, access logs with W3C trace context, optional
OpenTelemetry tracing, and the checks behind ``inhouse doctor``."""
