"""The security layer's per-request shortcuts keep its guarantees: a remembered API key is
forgotten the moment the key store changes, a remembered key is still compared in full, audit
entries committed together are each committed before their caller goes on, and an audit log
written by two processes still verifies."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import run_server
from inhouse.security.audit import AuditEntry, AuditLog
from inhouse.security.audit_commit import AuditWriteError, GroupCommitter
from inhouse.security.keys import KeyStore
from models import sleep_model, slow_request, write_model

X = np.ones((1, 4), np.float32).ravel().tolist()
INFER = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": X},
                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": X}]}


def test_remembered_key_is_compared_in_full_and_forgotten_on_change(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key, rec = store.create("app", ["infer"])
    assert store.lookup(key) == rec
    assert store.lookup(key) == rec  # remembered
    assert store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # same id, another secret
    assert store.lookup(key + "x") is None
    assert store.lookup(key) == rec

    other = KeyStore(tmp_path)  # another process: the `inhouse keys` CLI
    assert other.revoke("app") == [rec.key_id]
    revoked = store.lookup(key)
    assert revoked is not None and revoked.revoked_at is not None
    second, rec2 = other.create("app2", ["infer"])
    other.close()
    assert store.lookup(second) == rec2
    assert store.lookup(key).revoked_at is not None  # type: ignore[union-attr]

    third, rec3 = store.create("app3", ["admin"])  # this process
    assert store.lookup(third) == rec3
    assert store.revoke(rec3.key_id) == [rec3.key_id]
    assert store.lookup(third).revoked_at is not None  # type: ignore[union-attr]
    store.close()


def test_every_change_by_another_connection_is_seen_by_the_next_lookup(tmp_path: Path) -> None:
    store, other = KeyStore(tmp_path), KeyStore(tmp_path)
    assert store._watch is not None  # the shared-memory shortcut is on for this test to mean anything
    for i in range(40):
        key, rec = other.create(f"k{i}", ["infer"])
        assert store.lookup(key) == rec
        assert store.lookup(key) == rec and store._watch.unchanged()  # nothing new: SQLite not asked
        if i % 3 == 0:  # a WAL reset rewrites the header's salts instead of growing the log
            other._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert other.revoke(rec.key_id) == [rec.key_id]
        assert store.lookup(key).revoked_at is not None  # type: ignore[union-attr]
    other.close()
    store.close()


def test_revocation_by_another_process_is_seen_by_the_next_lookup(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    for i in range(2):
        key, rec = store.create(f"k{i}", ["infer"])
        assert store.lookup(key) == rec and store.lookup(key) == rec
        code = ("from pathlib import Path; from inhouse.security.keys import KeyStore; "
                f"print(KeyStore(Path({str(tmp_path)!r})).revoke({rec.key_id!r}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert rec.key_id in out.stdout
        assert store.lookup(key).revoked_at is not None  # type: ignore[union-attr]
    store.close()


def test_revocation_through_the_api_is_immediate_for_a_remembered_key(repo: Path) -> None:
    data = repo.parent / "data"
    store = KeyStore(data)
    admin = store.create("ops", ["admin"])[0]
    key, rec = store.create("app", ["infer"])
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add") as srv, srv.client() as c:
        for _ in range(3):
            assert c.post("/v2/models/add/infer", json=INFER, headers={"x-api-key": key}).status_code == 200
        r = c.delete(f"/v2/security/keys/{rec.key_id}", headers={"x-api-key": admin})
        assert r.json() == {"revoked": [rec.key_id]}
        r = c.post("/v2/models/add/infer", json=INFER, headers={"x-api-key": key})
        assert r.status_code == 401 and "revoked" in r.json()["error"]


def _entry(i: int) -> AuditEntry:
    return AuditEntry(action="infer", model="add", status=200, request_id=f"r{i}")


def _committed(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT request_id FROM audit")}
    finally:
        db.close()


def test_group_commit_commits_each_entry_before_its_caller_goes_on(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, b"s" * 32)
    commits = GroupCommitter(log)

    async def one(i: int) -> None:
        await commits.commit(_entry(i))
        assert f"r{i}" in _committed(log.path)  # visible to another connection: committed

    async def main() -> None:
        await one(0)  # nothing else in flight: committed at once, alone
        assert (commits.commits, commits.entries) == (1, 1)
        commits.in_flight = 8
        await asyncio.gather(*(one(i) for i in range(1, 9)))
        # no writer process started: the eight overlapping ones share one transaction on the loop
        assert (commits.commits, commits.entries) == (2, 9)
        commits.in_flight = 0

    asyncio.run(main())
    report = log.verify()
    assert report.ok and report.entries == 9, report.problems
    log.close()


def _lock_db(path: Path) -> sqlite3.Connection:
    """Another connection holding the audit log's write lock: every writer waits for it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


def test_audit_writer_commits_off_the_event_loop_and_close_drains(tmp_path: Path) -> None:
    """With the writer process started, overlapping entries are committed by it: while it waits
    for the database (held by another connection here), the event loop keeps running and the
    callers wait; once it commits they go on. close() commits what is still queued."""
    log = AuditLog(tmp_path, b"s" * 32)
    commits = GroupCommitter(log)

    async def main() -> None:
        assert await commits.start(b"s" * 32, tmp_path, False)
        assert commits.writer_pid is not None
        commits.in_flight = 2
        holder = _lock_db(log.path)
        waiting = [asyncio.ensure_future(commits.commit(_entry(i))) for i in range(2)]
        ticks = 0
        for _ in range(20):  # on the event loop, this would wait for the lock instead
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not any(w.done() for w in waiting)
        holder.rollback()
        await asyncio.wait_for(asyncio.gather(*waiting), 20)
        assert _committed(log.path) == {"r0", "r1"} and commits.by_writer == 2

        holder.execute("BEGIN IMMEDIATE")
        more = [asyncio.ensure_future(commits.commit(_entry(i))) for i in (5, 6)]
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(commits.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # the writer still has entries to commit
        holder.rollback()
        holder.close()
        await asyncio.wait_for(closing, 20)
        await asyncio.wait_for(asyncio.gather(*more), 1)
        assert _committed(log.path) == {"r0", "r1", "r5", "r6"}
        assert commits.writer_pid is None
        await commits.commit(_entry(8))  # no writer any more: committed at once, on the event loop
        assert "r8" in _committed(log.path)

    asyncio.run(main())
    report = log.verify()
    assert report.ok and report.entries == 5, report.problems
    log.close()


def test_audit_entries_wait_behind_the_batch_in_flight_and_go_together(tmp_path: Path) -> None:
    """One batch at a time goes to the writer: entries finishing while it commits one are held
    and sent together once it has (fewer pipe writes and reads per entry under load)."""
    log = AuditLog(tmp_path, b"s" * 32)
    commits = GroupCommitter(log)

    async def main() -> None:
        assert await commits.start(b"s" * 32, tmp_path, False)
        commits.in_flight = 10
        holder = _lock_db(log.path)
        first = asyncio.ensure_future(commits.commit(_entry(0)))
        await asyncio.sleep(0.05)  # sent; the writer waits for the database
        queued = []
        for i in range(1, 6):  # one per turn of the event loop, while that batch is in flight
            queued.append(asyncio.ensure_future(commits.commit(_entry(i))))
            await asyncio.sleep(0.01)
        assert (commits.commits, commits.entries) == (1, 1) and not any(q.done() for q in [first, *queued])
        holder.rollback()
        holder.close()
        await asyncio.wait_for(asyncio.gather(first, *queued), 20)
        assert (commits.commits, commits.entries, commits.by_writer) == (2, 6, 6)
        assert _committed(log.path) == {f"r{i}" for i in range(6)}
        await commits.close()

    asyncio.run(main())
    report = log.verify()
    assert report.ok and report.entries == 6, report.problems
    log.close()


def test_audit_writer_death_fails_its_callers_and_it_is_restarted(tmp_path: Path) -> None:
    """Entries the writer held when it died fail their callers (never answered unrecorded);
    later ones are committed on the event loop until a new writer has started."""
    log = AuditLog(tmp_path, b"s" * 32)
    commits = GroupCommitter(log)

    async def main() -> None:
        assert await commits.start(b"s" * 32, tmp_path, False)
        first = commits.writer_pid
        assert first is not None
        commits.in_flight = 3
        os.kill(first, signal.SIGSTOP)  # it will not get to the batch sent next
        waiting = [asyncio.ensure_future(commits.commit(_entry(i))) for i in range(3)]
        await asyncio.sleep(0.1)
        behind = [asyncio.ensure_future(commits.commit(_entry(i))) for i in (4, 5)]  # held behind that batch
        await asyncio.sleep(0.05)
        assert commits.commits == 1 and not any(w.done() for w in [*waiting, *behind])
        os.kill(first, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 20)
        assert all(isinstance(r, AuditWriteError) for r in results), results
        await asyncio.wait_for(asyncio.gather(*behind), 20)  # never sent: committed on the event loop
        await commits.commit(_entry(10))  # meanwhile: on the event loop
        for _ in range(200):
            if commits.writer_pid not in (None, first):
                break
            await asyncio.sleep(0.05)
        assert commits.writer_pid not in (None, first)
        await asyncio.gather(*(commits.commit(_entry(i)) for i in range(11, 14)))
        await commits.close()

    asyncio.run(main())
    assert {"r4", "r5", "r10", "r11", "r12", "r13"} <= _committed(log.path)
    assert not {"r0", "r1", "r2"} & _committed(log.path)
    report = log.verify()
    assert report.ok, report.problems
    log.close()


def test_group_commit_failure_fails_every_caller(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, b"s" * 32)
    commits = GroupCommitter(log)
    log.close()  # the log can no longer be written

    async def main() -> list[BaseException | None]:
        commits.in_flight = 3
        return await asyncio.wait_for(
            asyncio.gather(*(commits.commit(_entry(i)) for i in range(3)), return_exceptions=True), 10)

    results = asyncio.run(main())
    # every caller gets the coded refusal (503, 4050), SQLite's error behind it
    assert all(isinstance(r, AuditWriteError) and isinstance(r.__cause__, sqlite3.ProgrammingError)
               for r in results), results
    async def later() -> None:
        await commits.commit(_entry(9))

    with pytest.raises(AuditWriteError):
        asyncio.run(later())


def test_audit_log_written_by_two_processes_verifies(tmp_path: Path) -> None:
    server, cli = AuditLog(tmp_path, b"s" * 32), AuditLog(tmp_path, b"s" * 32)
    seqs = [server.append(_entry(1)), cli.append_admin("keys.create"), server.append(_entry(2)),
            *server.append_many([_entry(3), _entry(4)]), cli.append(_entry(5)), server.append(_entry(6))]
    assert seqs == [1, 2, 3, 4, 5, 6, 7]
    report = server.verify()
    assert report.ok and report.entries == 7, report.problems
    tamper = sqlite3.connect(tmp_path / "audit.sqlite3")
    tamper.execute("DELETE FROM audit WHERE seq = 7")
    tamper.commit()
    tamper.close()
    assert not cli.verify().ok  # a removed tail is still found
    server.close()
    cli.close()


def test_concurrent_requests_are_all_audited_and_verify(repo: Path) -> None:
    data = repo.parent / "data"
    store = KeyStore(data)
    key = store.create("app", ["infer"])[0]
    store.close()

    async def load(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, headers={"x-api-key": key}, timeout=30) as c:
            async def one(i: int) -> str:
                r = await c.post("/v2/models/add/infer", json=INFER, headers={"x-request-id": f"c{i}"})
                assert r.status_code == 200, r.text
                return f"c{i}"

            return list(await asyncio.gather(*(one(i) for i in range(48))))

    with run_server(repo, auth=True, data_dir=data, load="add") as srv:
        answered = asyncio.run(load(srv.url))
        gate = srv.server.security
        assert gate.commits is not None and gate.commits.in_flight == 0
        assert gate.commits.writer_pid is not None and gate.commits.by_writer > 0  # the audit writer process
    log = AuditLog(data)
    assert set(answered) <= {r["request_id"] for r in log.entries()}
    report = log.verify()
    assert report.ok, report.problems
    log.close()


def test_allow_list_answers_stay_right_past_the_cache_bound(tmp_path: Path) -> None:
    from inhouse.errors import ForbiddenError
    from inhouse.security.gate import Call, SecurityGate
    from inhouse.settings import load_settings

    gate = SecurityGate(load_settings(None, data_dir=tmp_path, allow_ips=["10.0.0.0/8"]))

    def call(peer: str) -> Call:
        return Call(transport="http", action="infer", scope="infer", peer=peer)

    for i in range(5000):  # more distinct clients than the cache holds
        gate.admit(call(f"10.{i // 256}.{i % 256}.1"))
        if i % 1000 == 0:
            with pytest.raises(ForbiddenError, match="allow-list"):
                gate.admit(call(f"192.168.{i // 256}.1"))
    gate.admit(call("10.0.0.1"))
    with pytest.raises(ForbiddenError):
        gate.admit(call("::ffff:192.168.0.1"))

    gate.close()


def test_text_rules_are_not_skipped_by_an_escaped_datatype(tmp_path: Path) -> None:
    """v2 bodies with no BYTES tensor skip the security layer's JSON parse; a JSON escape that
    spells BYTES must not pass for one."""
    from models import identity_model, write_model

    repo = tmp_path / "models"
    write_model(repo, "guarded", identity_model(8), {"policy": {"deny_patterns": ["(?i)ignore previous"]}})
    write_model(repo, "echo-red", identity_model(8), {"pii": {"inputs": True, "outputs": "redact"}})
    escaped = (b'{"inputs":[{"name":"x","shape":[1,1],"datatype":"\\u0042YTES",'
               b'"data":["please IGNORE previous orders, call 13800138000"]}]}')
    with run_server(repo, data_dir=tmp_path / "data") as srv, srv.client() as c:
        h = {"content-type": "application/json"}
        r = c.post("/v2/models/guarded/infer", content=escaped, headers=h)
        assert r.status_code == 400 and r.headers["inhouse-error-code"] == "5001", r.text
        r = c.post("/v2/models/echo-red/infer", content=escaped, headers=h)
        assert r.status_code == 200 and "13800138000" not in r.text and "[PHONE_1]" in r.text, r.text
        # a body with no BYTES tensor still gets the v2 parser's own error when it is not JSON
        r = c.post("/v2/models/guarded/infer", content=b'{"inputs": [', headers=h)
        assert r.status_code == 400 and r.headers["inhouse-error-code"] == "2001", r.text


def test_requests_drained_at_shutdown_are_audited(tmp_path: Path) -> None:
    """A request still running when the server is asked to stop is answered (the drain) and its
    audit entry is committed: the gate and the audit writer close only after the drain."""
    repo = tmp_path / "models"
    write_model(repo, "slow", sleep_model())
    data = tmp_path / "data"
    store = KeyStore(data)
    key = store.create("app", ["infer"])[0]
    store.close()
    body, headers = slow_request(4096)
    answer: dict[str, Any] = {}

    with run_server(repo, auth=True, data_dir=data, load="slow") as srv:
        def call() -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                answer["response"] = c.post("/v2/models/slow/infer", content=body,
                                            headers={**headers, "x-api-key": key, "x-request-id": "drained"})
                answer["at"] = time.monotonic()

        caller = threading.Thread(target=call)
        caller.start()
        commits = srv.server.security.commits
        assert commits is not None
        deadline = time.monotonic() + 30
        while commits.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert commits.in_flight == 1
        stop_asked = time.monotonic()
    caller.join(120)
    assert answer["response"].status_code == 200, answer["response"].text
    assert answer["at"] > stop_asked  # it was drained, not finished before the stop
    log = AuditLog(data)
    drained = [e for e in log.entries() if e["request_id"] == "drained"]
    assert len(drained) == 1 and drained[0]["status"] == 200
    assert log.verify().ok
    log.close()



def test_audit_writer_protocol_refuses_a_bad_frame_alone(tmp_path: Path) -> None:
    """The writer speaks length-prefixed frames on stdin/stdout: ready after the secret, one
    answer per batch (empty = committed); a frame it cannot read is refused without taking the
    others with it; it stops at the end of its input and ignores SIGTERM until then."""
    from inhouse.security.audit_writer import frame

    proc = subprocess.Popen([sys.executable, "-m", "inhouse.security.audit_writer", str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    def reply() -> bytes:
        assert proc.stdout is not None
        size = int.from_bytes(proc.stdout.read(4), "big")
        return proc.stdout.read(size)

    try:
        proc.stdin.write(frame(b"s" * 32))
        proc.stdin.flush()
        assert reply() == b""  # ready
        # an entry is the JSON array of AuditEntry's fields, in order
        good = b'[["infer", "http", null, "add", null, null, 200, null, null, "w1"]]'
        fields_as_object = b'[{"action": "infer", "model": "add", "status": 200, "request_id": "w3"}]'
        proc.stdin.write(frame(good) + frame(b"not json") + frame(fields_as_object) + frame(good.replace(b"w1", b"w2")))
        proc.stdin.flush()
        answers = [reply() for _ in range(4)]
        assert answers[0] == b"" and answers[3] == b"" and b"could not be read" in answers[1], answers
        assert b"must be an array" in answers[2], answers
        proc.send_signal(signal.SIGTERM)  # ignored: only the end of its input stops it
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.stdin.close()
        assert proc.wait(20) == 0
    assert _committed(tmp_path / "audit.sqlite3") == {"w1", "w2"}
    log = AuditLog(tmp_path, b"s" * 32)
    assert log.verify().ok
    log.close()


def test_concurrent_grpc_requests_are_all_audited_by_the_writer(repo: Path) -> None:
    """gRPC records through the same gate: overlapping calls are committed by the audit writer,
    each before its answer, and the log verifies."""
    import grpc

    from inhouse.protocols.proto import grpc_service_pb2 as pb
    from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc

    data = repo.parent / "data"
    store = KeyStore(data)
    key = store.create("app", ["infer"])[0]
    store.close()
    x = np.ones((1, 4), np.float32).tobytes()
    request = pb.ModelInferRequest(model_name="add")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(x)

    async def load(target: str) -> list[str]:
        async with grpc.aio.insecure_channel(target) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            async def one(i: int) -> str:
                reply = await infer(request, metadata=(("x-api-key", key), ("x-request-id", f"g{i}")))
                assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
                return f"g{i}"

            return list(await asyncio.gather(*(one(i) for i in range(48))))

    with run_server(repo, auth=True, data_dir=data, load="add") as srv:
        assert srv.grpc_target is not None
        answered = asyncio.run(load(srv.grpc_target))
        commits = srv.server.security.commits
        assert commits is not None and commits.in_flight == 0 and commits.by_writer > 0
    log = AuditLog(data)
    rows = {r["request_id"]: r for r in log.entries() if r["transport"] == "grpc"}
    assert set(answered) <= set(rows) and all(rows[i]["status"] == 200 for i in answered)
    assert log.verify().ok
    log.close()


def test_an_admitted_caller_is_remembered_and_every_check_still_holds(tmp_path: Path) -> None:
    """A caller's next request skips the checks that do not count requests, but a revoked or
    expired key, another model or scope, and the rate limit are still refused at once."""
    from inhouse.errors import ForbiddenError, RateLimitedError, UnauthenticatedError
    from inhouse.security.gate import Call, SecurityGate
    from inhouse.settings import load_settings

    store = KeyStore(tmp_path)
    limited = store.create("limited", ["infer"], models=["add"], rate="3/minute")[0]
    brief = store.create("brief", ["infer"], expires_at=time.time() + 1.0)[0]
    other = store.create("other", ["infer"])[0]
    store.close()
    gate = SecurityGate(load_settings(None, data_dir=tmp_path, auth=True))

    def call(key: str, model: str = "add", scope: Any = "infer") -> Call:
        return Call(transport="http", action="infer", scope=scope, model=model, peer="10.1.2.3", credential=key)

    first = call(limited)
    gate.admit(first)
    assert first.key is not None and first.client_ip == "10.1.2.3" and len(gate._admitted) == 1
    for _ in range(2):
        again = call(limited)
        gate.admit(again)  # remembered
        assert again.key is first.key and again.client_ip == "10.1.2.3"
    with pytest.raises(RateLimitedError):  # the fourth in a minute: counted on the remembered path too
        gate.admit(call(limited))
    with pytest.raises(ForbiddenError, match="may not use model"):
        gate.admit(call(limited, model="other-model"))
    with pytest.raises(ForbiddenError, match="lacks the 'admin' scope"):
        gate.admit(call(limited, scope="admin"))
    with pytest.raises(UnauthenticatedError, match="not valid"):
        gate.admit(call(limited[:-1] + ("A" if limited[-1] != "A" else "B")))

    gate.admit(call(brief))
    gate.admit(call(brief))
    time.sleep(1.1)
    with pytest.raises(UnauthenticatedError, match="expired"):
        gate.admit(call(brief))

    gate.admit(call(other))
    revoker = KeyStore(tmp_path)  # another connection, as the CLI would be
    assert revoker.revoke("other")
    revoker.close()
    with pytest.raises(UnauthenticatedError, match="revoked"):
        gate.admit(call(other))
    gate.close()
