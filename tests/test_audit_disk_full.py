"""The audit log on a full disk: a request whose audit entry cannot be committed is refused with
a coded 503 (gRPC UNAVAILABLE), never answered unrecorded and never a 500. The disk is made full
for real: the server process runs under a file-size limit (RLIMIT_FSIZE), so SQLite's writes fail
the way they do when the file system has no room left."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.security.audit import AuditLog
from inhouse.security.keys import KeyStore
from models import add_model, write_model

X = np.ones((1, 4), np.float32).ravel().tolist()
INFER = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": X},
                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": X}]}
LIMIT = 256 * 1024  # bytes any file the server writes may reach


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_a_full_disk_refuses_instead_of_answering_unaudited(tmp_path: Path) -> None:
    repo, data = tmp_path / "models", tmp_path / "data"
    write_model(repo, "add", add_model())
    store = KeyStore(data)
    key, _ = store.create("app", ["infer"])
    store.close()
    http_port, grpc_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http_port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--data-dir", str(data), "--auth",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # a log file would be limited too
        env={**os.environ, "INHOUSE_LOG_LEVEL": "error"}, preexec_fn=_limit_file_size)
    answered: list[str] = []
    refused: list[httpx.Response] = []
    try:
        with httpx.Client(base_url=url, timeout=30, headers={"x-api-key": key}) as c:
            end = time.monotonic() + 120
            while True:
                try:
                    if c.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < end, "the server did not start"
                time.sleep(0.2)
            # until the audit log has filled what it may write (the database file outgrows the
            # limit for good after a few hundred entries)
            for _ in range(5000):
                rid = uuid.uuid4().hex
                r = c.post("/v2/models/add/infer", json=INFER, headers={"x-request-id": rid})
                if r.status_code == 200:
                    answered.append(rid)
                    continue
                refused.append(r)
                if len(refused) >= 20:
                    break
            assert refused, "the audit log never filled"
            assert {r.status_code for r in refused} == {503}, [r.text for r in refused[:3]]
            assert {r.headers.get("inhouse-error-code") for r in refused} == {"4050"}, refused[0].headers
            assert "audit log cannot be written" in refused[-1].json()["error"]
            # another route (the HTTP security middleware, not the v2 infer entry)
            meta = c.get("/v2/models/add")
            assert meta.status_code == 503 and "[4050]" in meta.text, meta.text
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            req = pb.ModelInferRequest(model_name="add")
            for name in ("a", "b"):
                req.inputs.add(name=name, datatype="FP32", shape=[1, 4])
                req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30,
                                                                      metadata=(("x-api-key", key),))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "[4050]" in str(err.value.details())
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log = AuditLog(data, create=False)
    try:
        recorded = {e["request_id"] for e in log.entries()}
        assert log.verify().ok
    finally:
        log.close()
    assert answered and not [r for r in answered if r not in recorded]


_FILL = """
import resource, sys
from pathlib import Path
from inhouse.security.audit import AuditEntry, AuditLog
log = AuditLog(Path(sys.argv[1]), background_checkpoint=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))
try:
    for i in range(100000):
        log.append(AuditEntry("infer", detail={"n": i, "pad": "x" * 200}))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_failed_audit_write_reports_why(tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself when the disk is full; the log must not then
    fail its own ROLLBACK and report 'cannot rollback' instead of the reason."""
    out = subprocess.run([sys.executable, "-c", _FILL, str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.startswith("OperationalError"), out
    assert "cannot rollback" not in out and ("disk" in out or "full" in out), out
