"""Access logs, request ids and W3C trace context over a real server."""

from __future__ import annotations

import logging
import re

import orjson
import pytest

from conftest import RunningServer
from inhouse.logs import JsonFormatter, RequestContextFilter, TextFormatter
from inhouse.observability.context import new_context, parse_traceparent

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SECRET = "Jane Roe, +86 138 0013 8000"


def _access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "inhouse.access"]


def test_traceparent_is_propagated_and_returned(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": [SECRET]}]}
    with server.client() as c:
        r = c.post("/v2/models/echo-str/infer", json=body, headers={"traceparent": CALLER, "x-request-id": "req-42"})
        assert r.status_code == 200
        parsed = parse_traceparent(r.headers["traceparent"])
        assert parsed is not None
        trace_id, span_id, sampled = parsed
        assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"  # same trace as the caller
        assert span_id != "00f067aa0ba902b7" and sampled  # our own span in it
        assert r.headers["x-request-id"] == "req-42"

        # without a traceparent (or with a broken one) the server starts a trace
        for headers in ({}, {"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-01"},
                        {"traceparent": "garbage"}):
            r2 = c.get("/v2/health/ready", headers=headers)
            p2 = parse_traceparent(r2.headers["traceparent"])
            assert p2 is not None and p2[0] != trace_id
            assert re.fullmatch(r"[A-Za-z0-9]{8,}", r2.headers["x-request-id"])
        # a client request id that could forge log lines is replaced
        r3 = c.get("/v2/health/live", headers={"x-request-id": "a b\" <script>"})
        assert r3.headers["x-request-id"] != "a b\" <script>"

    recs = [r for r in _access_records(caplog) if getattr(r, "route", "") == "/v2/models/{model}/infer"]
    assert len(recs) == 1
    rec = recs[0]
    assert rec.request_id == "req-42" and rec.trace_id == trace_id  # type: ignore[attr-defined]
    assert rec.model == "echo-str" and rec.version == 1 and rec.status == 200  # type: ignore[attr-defined]
    assert rec.latency_ms > 0 and rec.compute_ms >= 0 and rec.queue_ms >= 0  # type: ignore[attr-defined]
    # PII-safe: no payloads in the log line, in either format
    line = JsonFormatter().format(rec)
    doc = orjson.loads(line)
    assert doc["msg"] == "request" and doc["request_id"] == "req-42" and doc["status"] == 200
    assert "client" not in doc
    assert "Jane" not in line and "138" not in line
    assert "Jane" not in TextFormatter().format(rec)


def test_errors_carry_their_code_in_the_access_log(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    with server.client() as c:
        r = c.post("/v2/models/add/infer", json={"inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]})
        assert r.status_code == 400 and "traceparent" in r.headers
        assert c.get("/no/such/route").status_code == 404
    recs = _access_records(caplog)
    bad = [r for r in recs if getattr(r, "status", 0) == 400]
    assert bad and bad[0].code == 2006 and bad[0].model == "add"  # type: ignore[attr-defined]
    missing = [r for r in recs if getattr(r, "status", 0) == 404]
    assert missing and missing[0].route == "unmatched" and missing[0].code == 2004  # type: ignore[attr-defined]


def test_access_log_can_be_turned_off(server_factory, repo, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="inhouse.access")
    with server_factory(repo, access_log=False, log_client_address=True, load="none") as srv, srv.client() as c:
        r = c.get("/v2/health/live")
        assert "traceparent" in r.headers  # trace context still returned
    assert not _access_records(caplog)


def test_records_logged_inside_a_request_carry_its_ids() -> None:
    from inhouse.observability.context import activate, deactivate

    ctx = new_context(CALLER, "abc")
    record = logging.LogRecord("inhouse.x", logging.ERROR, __file__, 1, "boom", None, None)
    token = activate(ctx)
    try:
        RequestContextFilter().filter(record)
    finally:
        deactivate(token)
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["request_id"] == "abc" and doc["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("header", [
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # future version: extra fields allowed
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
])
def test_traceparent_parser_accepts_valid_headers(header: str) -> None:
    assert parse_traceparent(header) is not None


@pytest.mark.parametrize("header", [
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has exactly four fields
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
])
def test_traceparent_parser_rejects_invalid_headers(header: str) -> None:
    assert parse_traceparent(header) is None


def test_log_lines_follow_stderr_when_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's handler writes to sys.stderr as it is at each record: a test runner or host
    application that swaps stderr and closes the old one gets the lines, not 'closed file' errors."""
    import io
    import sys

    from inhouse.logs import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("info", "json")
        logging.getLogger("inhouse.test").info("one")
        assert '"msg":"one"' in first.getvalue()
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("inhouse.test").info("two")
        assert '"msg":"two"' in second.getvalue()
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
