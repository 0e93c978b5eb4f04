"""The audit log: an append-only SQLite store (WAL) where every entry carries the hash of the
previous one and an HMAC under a key derived from the server secret.

``verify`` detects any change, deletion, insertion or reordering of entries: the chain links
each entry to the one before, the HMAC stops an attacker without the secret from re-computing
it, and a signed *head* record (last sequence number and hash) exposes a removed tail.
Retention pruning deletes the oldest entries and moves a signed *anchor* (first kept sequence
number and its predecessor's hash), so the rest still verifies.

An entry is committed before the response that it records is sent. WAL with
``synchronous=NORMAL`` survives the process being killed (SIGKILL); ``fsync=True``
(``synchronous=FULL``) also survives power loss, at the cost of one fsync per entry."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from inhouse.security.pii import redact
from inhouse.security.secret import derive, load_or_create_secret

AUDIT_DB = "audit.sqlite3"
GENESIS = "0" * 64
FIELDS = ("seq", "ts", "transport", "key_id", "action", "model", "version", "client_ip", "status", "code",
          "latency_ms", "request_id", "trace_id", "detail")

_COLUMNS = ", ".join(FIELDS)
_INSERT = (f"INSERT INTO audit ({_COLUMNS}, prev_hash, hash, mac) "  # noqa: S608 - constant column names
           f"VALUES ({', '.join('?' * (len(FIELDS) + 3))})")
_SELECT = f"SELECT {_COLUMNS}, prev_hash, hash, mac FROM audit"  # noqa: S608 - constant column names

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    transport TEXT,
    key_id TEXT,
    action TEXT NOT NULL,
    model TEXT,
    version TEXT,
    client_ip TEXT,
    status INTEGER,
    code INTEGER,
    latency_ms REAL,
    request_id TEXT,
    trace_id TEXT,
    detail TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL, mac TEXT NOT NULL);
"""


class AuditEntry(NamedTuple):
    """One audit entry as a request's security check hands it over. A tuple: made on every
    request, and sent to the audit writer process as a JSON array in this field order."""

    action: str
    transport: str = "http"
    key_id: str | None = None
    model: str | None = None
    version: str | None = None
    client_ip: str | None = None
    status: int | None = None
    code: int | None = None
    latency_ms: float | None = None
    request_id: str | None = None
    trace_id: str | None = None
    detail: dict[str, Any] | None = None
    ts: float = 0.0
    """Unix time of the event; 0: the time it is committed."""


@dataclass
class VerifyReport:
    ok: bool
    entries: int
    first_seq: int | None
    last_seq: int | None
    problems: list[str]


def _canonical(row: dict[str, Any]) -> bytes:
    return orjson.dumps({k: row[k] for k in FIELDS}, option=orjson.OPT_SORT_KEYS)


def _chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return _chain_hash_of(prev_hash, _canonical(row))


def _chain_hash_of(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical).hexdigest()


def _clean_detail(detail: dict[str, Any] | None) -> str | None:
    if not detail:
        return None
    return redact(orjson.dumps(detail, default=str).decode())


class _HeadMoved(Exception):
    """The head record is not where this connection last left it (another process appended)."""


class AuditLog:
    def __init__(self, data_dir: Path, secret: bytes | None = None, *, fsync: bool = False,
                 create: bool = True, background_checkpoint: bool = False) -> None:
        self.path = data_dir / AUDIT_DB
        if not create and not self.path.exists():
            raise FileNotFoundError(f"There is no audit log at {self.path}; check --data-dir.")
        data_dir.mkdir(parents=True, exist_ok=True)
        self._key = derive(secret or load_or_create_secret(data_dir, create=create), "audit")
        self._hmac = hmac.new(self._key, digestmod=hashlib.sha256)  # keyed once; copied per MAC
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        if background_checkpoint:
            # Copying the WAL into the database (and its fsync) happens in checkpoint(), called off
            # the request path, instead of inside whichever commit crosses the threshold.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._lock = threading.Lock()
        self._head: tuple[int, str, str] | None = None  # as this connection last committed it

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _mac(self, text: str) -> str:
        h = self._hmac.copy()
        h.update(text.encode())
        return h.hexdigest()

    def _meta(self, name: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT value, mac FROM audit_meta WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        value: dict[str, Any] = orjson.loads(row[0])
        value["_mac_ok"] = hmac.compare_digest(self._mac(f"{name}|{row[0]}"), row[1])
        return value

    def _set_meta(self, name: str, value: dict[str, Any]) -> None:
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        self._db.execute("INSERT INTO audit_meta (name, value, mac) VALUES (?,?,?) ON CONFLICT(name) DO UPDATE "
                         "SET value = excluded.value, mac = excluded.mac", (name, text, self._mac(f"{name}|{text}")))

    def checkpoint(self) -> None:
        """Move committed WAL pages into the database file (its own connection; never blocks writers)."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=1000")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    # ---- writing --------------------------------------------------------------------------------
    def append(self, e: AuditEntry) -> int:
        """Commit one entry (durably, before returning); returns its sequence number."""
        return self.append_many([e])[0]

    def append_many(self, entries: list[AuditEntry]) -> list[int]:
        """Commit several entries in one transaction (group commit); their sequence numbers."""
        now = time.time()
        rows = [{
            "seq": 0, "ts": e.ts or now, "transport": e.transport, "key_id": e.key_id, "action": e.action,
            "model": e.model, "version": e.version, "client_ip": e.client_ip, "status": e.status, "code": e.code,
            "latency_ms": None if e.latency_ms is None else round(e.latency_ms, 3),
            "request_id": e.request_id, "trace_id": e.trace_id, "detail": _clean_detail(e.detail),
        } for e in entries]  # exactly the keys of FIELDS, in that order
        with self._lock:
            try:
                return self._commit(rows, self._head)
            except _HeadMoved:  # another process wrote since our last commit: read the head again
                return self._commit(rows, None)

    def _commit(self, rows: list[dict[str, Any]], head: tuple[int, str, str] | None) -> list[int]:
        """Insert ``rows`` after ``head`` (sequence number, hash and stored text of the head record
        as this connection last wrote it; None: read it) and move the head, in one transaction.
        The head moves only if it still reads as ``head`` said, so a stale one raises _HeadMoved
        and nothing is written."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if head is None:
                row = db.execute("SELECT value FROM audit_meta WHERE name = 'head'").fetchone()
                if row is None:
                    head = (0, GENESIS, "")
                else:
                    h = orjson.loads(row[0])
                    head = (h["seq"], h["hash"], row[0])
                fresh = True
            else:
                fresh = False
            seq, prev, old_text = head
            params, seqs = [], []
            for row in rows:
                seq += 1
                row["seq"] = seq
                digest = _chain_hash_of(prev, orjson.dumps(row, option=orjson.OPT_SORT_KEYS))
                params.append((*row.values(), prev, digest, self._mac(digest)))
                seqs.append(seq)
                prev = digest
            text = orjson.dumps({"seq": seq, "hash": prev}, option=orjson.OPT_SORT_KEYS).decode()
            try:
                db.executemany(_INSERT, params)
                if old_text:
                    moved = db.execute("UPDATE audit_meta SET value = ?, mac = ? WHERE name = 'head' AND value = ?",
                                       (text, self._mac(f"head|{text}"), old_text)).rowcount != 1
                else:
                    db.execute("INSERT INTO audit_meta (name, value, mac) VALUES ('head', ?, ?)",
                               (text, self._mac(f"head|{text}")))
                    moved = False
            except sqlite3.IntegrityError:
                if fresh:
                    raise
                moved = True
            if moved:
                if fresh:
                    raise sqlite3.DatabaseError("the audit log's head record changed inside a write transaction")
                raise _HeadMoved
            db.execute("COMMIT")
        except BaseException:
            self._head = None
            if db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk: SQLITE_FULL)
                db.execute("ROLLBACK")
            raise
        self._head = (seq, prev, text)
        return seqs

    def append_admin(self, action: str, detail: dict[str, Any] | None = None, transport: str = "cli") -> int:
        """An administrative action taken outside a request (the CLI)."""
        import getpass

        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = None
        return self.append(AuditEntry(action=action, transport=transport, detail={**(detail or {}), "os_user": who}))

    def prune(self, before_ts: float) -> int:
        """Delete entries older than ``before_ts``; the rest still verifies. Returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                head = self._meta("head")
                if head is None:
                    self._db.execute("ROLLBACK")
                    return 0
                row = self._db.execute("SELECT seq, prev_hash FROM audit WHERE ts >= ? ORDER BY seq LIMIT 1",
                                       (before_ts,)).fetchone()
                keep_seq, keep_prev = row if row is not None else (head["seq"] + 1, head["hash"])
                n = self._db.execute("DELETE FROM audit WHERE seq < ?", (keep_seq,)).rowcount
                if n:
                    self._set_meta("anchor", {"seq": keep_seq, "prev_hash": keep_prev})
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return n

    # ---- reading --------------------------------------------------------------------------------
    def entries(self, since_ts: float | None = None) -> Iterator[dict[str, Any]]:
        sql = _SELECT
        args: tuple[Any, ...] = ()
        if since_ts is not None:
            sql += " WHERE ts >= ?"
            args = (since_ts,)
        cols = [*FIELDS, "prev_hash", "hash", "mac"]
        for r in self._db.execute(sql + " ORDER BY seq", args):
            yield dict(zip(cols, r, strict=True))

    def verify(self) -> VerifyReport:
        problems: list[str] = []
        anchor = self._meta("anchor")
        head = self._meta("head")
        if anchor is not None and not anchor["_mac_ok"]:
            problems.append("the retention anchor was altered (its HMAC does not match)")
        if head is not None and not head["_mac_ok"]:
            problems.append("the head record was altered (its HMAC does not match)")
        expect_seq = anchor["seq"] if anchor else 1
        prev = anchor["prev_hash"] if anchor else GENESIS
        count, first, last = 0, None, None
        for row in self.entries():
            seq = row["seq"]
            first = seq if first is None else first
            if seq != expect_seq:
                problems.append(f"entry {seq}: expected entry {expect_seq} here (entries removed or reordered)")
            if row["prev_hash"] != prev:
                problems.append(f"entry {seq}: does not link to the entry before it")
            digest = _chain_hash(row["prev_hash"], row)
            if digest != row["hash"]:
                problems.append(f"entry {seq}: content was altered (hash mismatch)")
            if not hmac.compare_digest(self._mac(row["hash"]), str(row["mac"])):
                problems.append(f"entry {seq}: HMAC does not match (forged or altered)")
            prev, expect_seq, last = row["hash"], seq + 1, seq
            count += 1
        if head is None:
            if count:
                problems.append("the head record is missing")
        elif head["seq"] != expect_seq - 1 or head["hash"] != prev:
            problems.append(f"the log ends at entry {expect_seq - 1} but the head says {head['seq']} "
                            "(entries removed from the end)")
        return VerifyReport(ok=not problems, entries=count, first_seq=first, last_seq=last, problems=problems)

