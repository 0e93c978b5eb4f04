"""OpenTelemetry spans exported over OTLP/HTTP to a real (tiny) collector endpoint."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conftest import run_server
from models import add_model, write_model

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                received.append(msg)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}", received
    httpd.shutdown()
    httpd.server_close()


def test_request_spans_follow_the_callers_trace(tmp_path: Path, collector: tuple[str, list]) -> None:  # type: ignore[type-arg]
    endpoint, received = collector
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    a = np.ones(4, np.float32).tolist()
    body = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": a},
                       {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": a}]}
    with run_server(repo, otlp_endpoint=endpoint, otel_service_name="inhouse-test") as srv, srv.client() as c:
        r = c.post("/v2/models/add/infer", json=body,
                   headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
        assert r.status_code == 200
        returned_span = r.headers["traceparent"].split("-")[2]
    # stopping the server flushes the exporter
    spans = [s for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans]
    services = {a.value.string_value for m in received for rs in m.resource_spans for a in rs.resource.attributes
                if a.key == "service.name"}
    assert services == {"inhouse-test"}
    by_name = {s.name: s for s in spans}
    server_span = by_name["POST /v2/models/add/infer"]
    assert server_span.trace_id.hex() == CALLER_TRACE
    assert server_span.parent_span_id.hex() == CALLER_SPAN
    assert server_span.span_id.hex() == returned_span  # the client can find our span
    attrs = {a.key: a.value for a in server_span.attributes}
    assert attrs["inhouse.model"].string_value == "add" and attrs["http.response.status_code"].int_value == 200
    phases = ["receive", "queue", "compute", "respond"]
    for name in phases:
        child = by_name[name]
        assert child.trace_id.hex() == CALLER_TRACE and child.parent_span_id == server_span.span_id
        assert server_span.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
        assert child.end_time_unix_nano <= server_span.end_time_unix_nano
    ordered = [by_name[n] for n in phases]
    assert all(x.end_time_unix_nano <= y.start_time_unix_nano + 1000 for x, y in itertools.pairwise(ordered))
    assert {a.key: a.value.int_value for a in by_name["compute"].attributes}["inhouse.batch_size"] == 1


def test_unsampled_callers_are_not_traced(tmp_path: Path, collector: tuple[str, list]) -> None:  # type: ignore[type-arg]
    endpoint, received = collector
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    with run_server(repo, otlp_endpoint=endpoint) as srv, srv.client() as c:
        r = c.get("/v2/health/ready", headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
        assert r.headers["traceparent"].startswith(f"00-{CALLER_TRACE}-") and r.headers["traceparent"].endswith("-00")
    assert not [s for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans]
