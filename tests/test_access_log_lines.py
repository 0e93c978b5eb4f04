"""The access log's fast lane: the lines a served request writes (built with orjson, written a
few milliseconds later in one batch) say what the JSON formatter would have written for the same record, every line
is out when ``inhouse serve`` exits on SIGTERM, and ``access_log_sample`` drops only successful
requests' lines."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest

from conftest import run_server
from inhouse import logs
from inhouse.logs import JsonFormatter, RequestContextFilter, configure_logging, json_line_sink
from inhouse.observability.access import access_log, log_access, log_rpc
from inhouse.observability.context import new_context
from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.security.pii import PiiLogFilter
from models import mlp_model, write_model

ADD = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                  {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
BAD = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _write_all(ctx_code: int | None) -> None:
    ctx = new_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "req-1")
    ctx.model, ctx.version, ctx.code, ctx.queue_s, ctx.compute_s = "risk", 3, ctx_code, 0.0004567, 0.0001234
    # a path carrying an e-mail address: redacted in the line, as the log filter does for records
    log_access("POST", "/v2/models/jane.roe@example.com/infer", "10.0.0.9", ctx, "/v2/models/{model}/infer",
               200 if ctx_code is None else 503, 0.0012345, True)
    log_rpc("/inference.GRPCInferenceService/ModelInfer", ctx, "OK" if ctx_code is None else "INTERNAL", 0.0009876)


def _without_ts(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc.pop("ts").endswith("Z")
    return doc


@pytest.mark.parametrize("code", [None, 1003])
def test_fast_lines_say_what_the_formatter_says(monkeypatch: pytest.MonkeyPatch, code: int | None) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, access_log.level)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(logs, "_sink", logs._sink)  # restored afterwards: later tests log through their capture
    try:
        configure_logging("info", "json")
        access_log.setLevel(logging.NOTSET)  # a log capture of an earlier test may have left a level
        assert json_line_sink(access_log) is not None

        async def in_a_loop() -> str:
            _write_all(code)
            written = out.getvalue()  # nothing yet: the lines wait to be written together
            await asyncio.sleep(0.05)
            assert written == ""
            return out.getvalue()

        fast = [_without_ts(orjson.loads(line)) for line in asyncio.run(in_a_loop()).splitlines()]
        # the same calls through logging (any other handler attached turns the fast lane off)
        extra = _Records()
        root.addHandler(extra)
        assert json_line_sink(access_log) is None
        _write_all(code)
        root.removeHandler(extra)
        slow = []
        for record in extra.records:
            RequestContextFilter().filter(record)
            PiiLogFilter().filter(record)
            slow.append(_without_ts(orjson.loads(JsonFormatter().format(record))))
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        access_log.setLevel(saved[2])
    assert fast == slow and len(fast) == 2
    assert list(fast[0]) == list(slow[0])  # the same keys in the same order
    assert fast[0]["path"] != "/v2/models/jane.roe@example.com/infer" and "jane" not in str(fast[0])
    assert fast[0]["latency_ms"] == 1.235 and fast[0]["queue_ms"] == 0.457 and fast[0]["client"] == "10.0.0.9"
    assert fast[1]["level"] == ("info" if code is None else "warning") and fast[1]["msg"] == "rpc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_writes_every_line_before_it_exits(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "mlp", mlp_model())
    http, grpc_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http}"
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--http-port", str(http),
             "--grpc-port", str(grpc_port), "--data-dir", str(tmp_path / "data"), "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not become ready"
            time.sleep(0.2)
        body = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
        bad = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP64", "data": [0.5] * 32}]}
        with httpx.Client(base_url=url) as c:
            for _ in range(150):
                assert c.post("/v2/models/mlp/infer", json=body).status_code == 200
            assert c.post("/v2/models/mlp/infer", json=bad).status_code == 400
        request = pb.ModelInferRequest(model_name="mlp")
        t = request.inputs.add(name="features", datatype="FP32", shape=[1, 32])
        t.contents.fp32_contents.extend([0.5] * 32)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(30):
                stub.ModelInfer(request, timeout=10)
        proc.send_signal(signal.SIGTERM)  # at once: the last lines must not be lost
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    docs = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line.startswith(b"{")]
    rest = [d for d in docs if d["logger"] == "inhouse.access" and d.get("route") == "/v2/models/{model}/infer"]
    rpcs = [d for d in docs if d["logger"] == "inhouse.access" and d.get("rpc", "").endswith("/ModelInfer")]
    assert len(rest) == 151 and len(rpcs) == 30
    assert sum(d["status"] == 200 for d in rest) == 150 and [d["code"] for d in rest if d["status"] == 400] == [2006]
    ok = [d for d in rest if d["status"] == 200] + rpcs
    assert all(d["model"] == "mlp" and d["version"] == 1 and d["latency_ms"] > 0 for d in ok)
    assert len({d["request_id"] for d in rest + rpcs}) == 181
    assert all(d["grpc_code"] == "OK" for d in rpcs)


def test_sampling_keeps_every_error(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    with run_server(repo, access_log_sample=0.0, load="add") as srv, srv.client() as c:
        for _ in range(20):
            assert c.post("/v2/models/add/infer", json=ADD).status_code == 200
        assert c.post("/v2/models/add/infer", json=BAD).status_code == 400
        assert c.get("/no/such/route").status_code == 404
        assert c.get("/v2/health/live").status_code == 200
    logged = [(r.status, getattr(r, "code", None)) for r in caplog.records  # type: ignore[attr-defined]
              if r.name == "inhouse.access"]
    assert logged == [(400, 2006), (404, 2004)]
