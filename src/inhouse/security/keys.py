"""API keys: random, high-entropy, shown once, stored only as a keyed hash in SQLite.

A key reads ``ih_<key id>_<secret>``. The key id (public, 16 hex digits) finds the record; the
whole key is checked against the stored HMAC-SHA256 with a constant-time comparison. The
server keeps the records in memory and reloads them whenever another process (the
``inhouse keys`` CLI) commits a change, so a revocation takes effect on the next request.

A key that has passed the HMAC check once is remembered (by key id, with the exact key
presented) until the store changes: later requests with it compare the presented key with the
remembered one in constant time instead of recomputing the HMAC. Any commit to the store
(create, revoke, from this process or another) drops every remembered key before the next
lookup, so a revocation still takes effect on the next request. Whether anything was committed
is first read from the database's shared wal-index header (:mod:`~inhouse.security.wal_watch`,
a memory read), then, when it moved, from SQLite itself."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from inhouse.security.ratelimit import parse_rate
from inhouse.security.secret import derive, load_or_create_secret
from inhouse.security.wal_watch import WalWatch

SCOPES = ("infer", "admin", "metrics")
KEYS_DB = "keys.sqlite3"
_PREFIX = "ih_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    digest BLOB NOT NULL,
    scopes TEXT NOT NULL,
    models TEXT,
    allow_ips TEXT,
    rate TEXT,
    expires_at REAL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class KeySpecError(ValueError):
    """Bad arguments for a key (unknown scope, bad CIDR, bad rate); the message says which."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None  # None: every model
    allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    rate: str | None = None
    expires_at: float | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    digest: bytes = field(default=b"", repr=False)

    def public(self) -> dict[str, object]:
        """What ``keys list`` shows: never the digest."""
        now = time.time()
        status = ("revoked" if self.revoked_at else
                  "expired" if self.expires_at is not None and self.expires_at <= now else "active")
        return {"key_id": self.key_id, "name": self.name, "scopes": sorted(self.scopes),
                "models": sorted(self.models) if self.models is not None else None,
                "allow_ips": [str(n) for n in self.allow_ips], "rate": self.rate,
                "expires_at": self.expires_at, "created_at": self.created_at,
                "revoked_at": self.revoked_at, "status": status}


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise KeySpecError(f"'{v}' is not an IP address or CIDR network (e.g. 10.0.0.0/8).") from None
    return tuple(nets)


def split_key(presented: str) -> str | None:
    """The key id of a presented key, or None when it is not shaped like one of ours."""
    if not presented.startswith(_PREFIX) or len(presented) > 128:
        return None
    key_id, sep, rest = presented[len(_PREFIX):].partition("_")
    if not sep or len(key_id) != 16 or not rest:
        return None
    return key_id


class KeyStore:
    def __init__(self, data_dir: Path, secret: bytes | None = None) -> None:
        self.path = data_dir / KEYS_DB
        data_dir.mkdir(parents=True, exist_ok=True)
        self._hash_key = derive(secret or load_or_create_secret(data_dir), "api-key")
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        wal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._version = -1
        self._generation = 0  # +1 whenever the records are reloaded
        self._cache: dict[str, ApiKey] = {}
        self._verified: dict[str, tuple[bytes, ApiKey]] = {}  # key id -> (presented key, record)
        self._watch: WalWatch | None = None
        self._refresh(force=True)
        # After the first read, so the -shm file exists; None: ask SQLite on every request.
        self._watch = WalWatch(self.path) if wal else None

    def close(self) -> None:
        with self._lock:
            if self._watch is not None:
                self._watch.close()
            self._db.close()

    def _digest(self, presented: str) -> bytes:
        return hmac.digest(self._hash_key, presented.encode(), "sha256")

    # ---- management -------------------------------------------------------------------------
    def create(self, name: str, scopes: Iterable[str], *, models: Iterable[str] | None = None,
               allow_ips: Iterable[str] = (), rate: str | None = None,
               expires_at: float | None = None) -> tuple[str, ApiKey]:
        """Make a key; returns (the key itself — shown once, never stored —, its record)."""
        scope_set = frozenset(s.strip() for s in scopes if s.strip())
        unknown = sorted(scope_set - set(SCOPES))
        if unknown or not scope_set:
            raise KeySpecError(f"Scopes must be a non-empty list of {', '.join(SCOPES)}; got {sorted(scope_set)}.")
        if not name or len(name) > 128:
            raise KeySpecError("A key needs a name of 1 to 128 characters.")
        nets = parse_networks(allow_ips)
        if rate is not None:
            parse_rate(rate)  # raises KeySpecError-compatible ValueError with a clear message
        model_set = frozenset(m.strip() for m in models if m.strip()) if models is not None else None
        key_id = secrets.token_hex(8)
        presented = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        rec = ApiKey(key_id=key_id, name=name, scopes=scope_set, models=model_set, allow_ips=nets, rate=rate,
                     expires_at=expires_at, created_at=time.time(), digest=self._digest(presented))
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, name, digest, scopes, models, allow_ips, rate, expires_at, "
                "created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (key_id, name, rec.digest, orjson.dumps(sorted(scope_set)).decode(),
                 orjson.dumps(sorted(model_set)).decode() if model_set is not None else None,
                 orjson.dumps([str(n) for n in nets]).decode(), rate, expires_at, rec.created_at))
            self._version = -1
            self._verified.clear()
        return presented, rec

    def revoke(self, key_id_or_name: str) -> list[str]:
        """Revoke by key id or name; returns the key ids revoked (empty when none matched)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id FROM api_keys WHERE (key_id = ? OR name = ?) AND revoked_at IS NULL",
                (key_id_or_name, key_id_or_name)).fetchall()
            ids = [r[0] for r in rows]
            self._db.executemany("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?",
                                 [(time.time(), i) for i in ids])
            self._version = -1
            self._verified.clear()
        return ids

    def list(self) -> list[ApiKey]:
        self._refresh(force=True)
        return sorted(self._cache.values(), key=lambda k: k.created_at)

    # ---- request path -------------------------------------------------------------------------
    def lookup(self, presented: str) -> ApiKey | None:
        """The record of a presented key if it is genuine (revoked and expired ones included:
        the caller decides and says why), else None."""
        key_id = split_key(presented)
        if key_id is None:
            return None
        self.generation()  # reloads the records if any key changed
        raw = presented.encode()
        seen = self._verified.get(key_id)
        if seen is not None and hmac.compare_digest(raw, seen[0]):
            return seen[1]
        rec = self._cache.get(key_id)
        if rec is None:
            # Spend the same HMAC work as for a known id so timing does not reveal which ids exist.
            hmac.compare_digest(self._digest(presented), b"\0" * 32)
            return None
        if not hmac.compare_digest(self._digest(presented), rec.digest):
            return None
        with self._lock:
            if self._cache.get(key_id) is rec:  # not replaced by a refresh meanwhile
                self._verified[key_id] = (raw, rec)
        return rec

    def generation(self) -> int:
        """A number that changes whenever any key may have changed (created, revoked, by any
        process): what a caller remembering an earlier answer checks it against."""
        watch = self._watch
        if watch is None or self._version < 0 or not watch.unchanged():
            self._refresh()
        return self._generation

    def _refresh(self, force: bool = False) -> None:
        """Reload the records if any connection (this one or another process's) committed since
        the last reload."""
        watch = self._watch
        with self._lock:
            if watch is not None and not force and self._version >= 0 and watch.unchanged():
                return
            header = watch.header() if watch is not None else None
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version and not force:
                if watch is not None:
                    watch.seen(header)
                return
            rows = self._db.execute(
                "SELECT key_id, name, digest, scopes, models, allow_ips, rate, expires_at, created_at, revoked_at "
                "FROM api_keys").fetchall()
            self._cache = {
                r[0]: ApiKey(key_id=r[0], name=r[1], digest=bytes(r[2]), scopes=frozenset(orjson.loads(r[3])),
                             models=frozenset(orjson.loads(r[4])) if r[4] is not None else None,
                             allow_ips=parse_networks(orjson.loads(r[5]) if r[5] else []), rate=r[6],
                             expires_at=r[7], created_at=r[8], revoked_at=r[9])
                for r in rows
            }
            self._verified.clear()
            self._generation += 1
            self._version = version
            if watch is not None:
                watch.seen(header)
