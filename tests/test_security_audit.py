"""The audit log: what is recorded, that hand-made tampering with the SQLite file is detected,
that retention keeps it verifiable, and that an answered request survives SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.security.audit import AuditLog
from inhouse.security.keys import KeyStore

X = np.ones((1, 4), np.float32).ravel().tolist()
INFER = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": X},
                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": X}]}
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _verify(data: Path) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["audit", "verify", "--data-dir", str(data)])
    return res.exit_code, res.output


def test_entries_and_tamper_detection(repo: Path) -> None:
    data = repo.parent / "data"
    store = KeyStore(data)
    key, rec = store.create("app", ["infer"], models=["add"])
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add") as srv, srv.client() as c:
        h = {"x-api-key": key, "traceparent": TRACE, "x-request-id": "req-1"}
        assert c.post("/v2/models/add/infer", json=INFER, headers=h).status_code == 200
        bad = {"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert c.post("/v2/models/add/infer", json=bad, headers={"x-api-key": key}).status_code == 400
        assert c.get("/v2/models/add", headers={"x-api-key": "ih_0123456789abcdef_x"}).status_code == 401
        assert c.get("/v2/models/mlp", headers={"x-api-key": key}).status_code == 403
        assert c.get("/v2/health/live").status_code == 200  # not audited
        c.get("/v2/models/add", headers={"x-api-key": key, "x-request-id": "bob@example.com"})
        for _ in range(5):
            c.get("/v2/models/add/ready", headers={"x-api-key": key})
    audit = AuditLog(data)
    rows = list(audit.entries())
    first = rows[0]
    assert (first["action"], first["key_id"], first["model"], first["status"], first["client_ip"]) == (
        "infer", rec.key_id, "add", 200, "127.0.0.1")
    assert first["request_id"] == "req-1" and first["trace_id"] == TRACE.split("-")[1]
    assert first["latency_ms"] > 0 and first["detail"] is None  # no payloads unless configured
    assert (rows[1]["status"], rows[1]["code"]) == (400, 2005) and "shape" in rows[1]["detail"]
    assert (rows[2]["status"], rows[2]["code"], rows[2]["key_id"]) == (401, 4001, None)
    assert (rows[3]["status"], rows[3]["code"], rows[3]["model"]) == (403, 4003, "mlp")
    assert not any(r["action"] == "health.live" for r in rows)
    assert "bob@example.com" not in json.dumps(rows)
    assert len(rows) == 10
    audit.close()
    assert _verify(data)[0] == 0

    db_path = data / "audit.sqlite3"
    pristine = data.parent / "pristine.sqlite3"
    shutil.copy(db_path, pristine)

    def tamper(sql: str) -> str:
        shutil.copy(pristine, db_path)
        for suffix in ("-wal", "-shm"):
            Path(str(db_path) + suffix).unlink(missing_ok=True)
        db = sqlite3.connect(db_path)
        db.executescript(sql)
        db.commit()
        db.close()
        code, out = _verify(data)
        assert code == 3, (sql, out)
        return out

    assert "altered" in tamper("UPDATE audit SET status = 200, code = NULL WHERE seq = 3;")
    assert "removed" in tamper("DELETE FROM audit WHERE seq = 4;")
    assert "end" in tamper("DELETE FROM audit WHERE seq = 10;")
    # reorder: swap the contents of two entries, hashes and MACs included
    tamper("""
        UPDATE audit SET seq = -1 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 5;
        UPDATE audit SET seq = 5 WHERE seq = -1;""")
    # an attacker re-computing the chain without the HMAC key is caught too
    tamper("UPDATE audit SET hash = 'aa', prev_hash = 'bb' WHERE seq = 7;")
    shutil.copy(pristine, db_path)

    # retention prunes old entries and the rest still verifies
    log = AuditLog(data)
    cut = list(log.entries())[6]["ts"]
    assert log.prune(cut) == 6
    assert next(r["seq"] for r in log.entries()) == 7
    log.close()
    code, out = _verify(data)
    assert code == 0 and "4 audit entries" in out
    tamper_after_prune = sqlite3.connect(db_path)
    tamper_after_prune.execute("DELETE FROM audit WHERE seq = 7")
    tamper_after_prune.commit()
    tamper_after_prune.close()
    assert _verify(data)[0] == 3

    res = CliRunner().invoke(app, ["audit", "export", "--since", "2020-01-01", "--data-dir", str(data)])
    lines = [json.loads(line) for line in res.output.splitlines()]
    assert res.exit_code == 0 and {"seq", "hash", "prev_hash", "mac", "time"} <= set(lines[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_answered_requests_survive_sigkill(repo: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = KeyStore(data)
    key = store.create("load", ["infer", "metrics"])[0]
    store.close()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo), "--auth",
         "--data-dir", str(data), "--http-port", str(port), "--grpc-port", "0", "--load", "add",
         "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    answered: list[str] = []
    stop = threading.Event()
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", headers={"x-api-key": key}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.1)

        def hammer(worker: int) -> None:
            with httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=5) as c:
                i = 0
                while not stop.is_set():
                    rid = f"w{worker}-{i}"
                    i += 1
                    try:
                        r = c.post("/v2/models/add/infer", json=INFER, headers={"x-request-id": rid})
                    except httpx.TransportError:
                        return
                    if r.status_code == 200:
                        answered.append(rid)

        threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert len(answered) > 10
    log = AuditLog(data)
    logged = {r["request_id"] for r in log.entries()}
    report = log.verify()
    log.close()
    missing = set(answered) - logged
    assert not missing, f"{len(missing)} answered requests are not in the audit log"
    assert report.ok, report.problems
