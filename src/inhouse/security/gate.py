"""The one security layer every transport calls: who is calling (API key, client address),
may they (IP allow-lists, scopes, model lists, expiry, revocation, rate limits), and the audit
record of what happened. Transport adapters fill a :class:`Call`, call :meth:`SecurityGate.admit`
before the request goes further and :meth:`SecurityGate.record` before the response is sent."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from inhouse.core.manager import ModelManager
from inhouse.core.spec import ModelSpec
from inhouse.errors import ForbiddenError, UnauthenticatedError
from inhouse.security.audit import AuditEntry, AuditLog
from inhouse.security.audit_commit import DONE, GroupCommitter
from inhouse.security.keys import ApiKey, KeyStore
from inhouse.security.network import Address, ClientAddressResolver, address_text, in_networks
from inhouse.security.pii import redact
from inhouse.security.ratelimit import RateLimiter, SharedRateLimiter
from inhouse.security.secret import load_or_create_secret
from inhouse.settings import ServerSettings

log = logging.getLogger(__name__)

Scope = Literal["infer", "admin", "metrics", "any", "open", "readiness"]
"""What a request needs: one of the key scopes, ``any`` (any valid key) or ``open`` (nothing;
liveness only: not checked, not audited). ``readiness`` is declared by readiness checks and
becomes ``open`` or ``metrics`` by the server's ``open_readiness`` (``pipeline.as_served``)."""


@dataclass(slots=True)
class Call:
    transport: str
    action: str
    scope: Scope
    model: str | None = None
    version: str | None = None
    peer: str | None = None
    forwarded_for: str | None = None
    credential: str | None = None
    request_id: str = ""
    trace_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # filled by admit()
    client_ip: str | None = None
    key: ApiKey | None = None
    recorded: bool = False
    detail: dict[str, Any] = field(default_factory=dict)
    in_flight: bool = False  # counted by the gate's group commit until recorded


class _Admitted(NamedTuple):
    generation: int
    key: ApiKey
    expires_at: float | None
    rate: str | None
    bucket: str  # the key's rate-limit bucket
    who: str


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def new_request_id(given: str | None) -> str:
    """The caller's request id if it is a plain token (so it cannot smuggle PII or log
    injection into the audit log), else a fresh one."""
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


class SecurityGate:
    def __init__(self, settings: ServerSettings, manager: ModelManager | None = None,
                 limiter: RateLimiter | SharedRateLimiter | None = None) -> None:
        self.settings = settings
        self.manager = manager
        self.auth = settings.auth
        from inhouse.security.keys import parse_networks

        self._allow = parse_networks(settings.allow_ips)
        self._resolver = ClientAddressResolver(parse_networks(settings.trusted_proxies))
        self._limiter = limiter if limiter is not None else RateLimiter()  # shared by workers when given
        self._rate_ip = settings.rate_limit_ip
        self._rate_key = settings.rate_limit_key
        data_dir: Path = settings.data_dir
        needs_secret = settings.auth or settings.audit_enabled()
        secret = self._secret = load_or_create_secret(data_dir) if needs_secret else None
        self.keys = KeyStore(data_dir, secret) if settings.auth else None
        self.audit = AuditLog(data_dir, secret, fsync=settings.audit_fsync, background_checkpoint=True) \
            if settings.audit_enabled() else None
        self.commits = GroupCommitter(self.audit) if self.audit is not None else None
        # A caller admitted before, per (API key, peer, X-Forwarded-For, scope, model): the key
        # checks (genuine, not revoked, the key's address list, scope, model list) hold
        # while no key has changed (the key store's generation) and the key has not expired, so
        # its next request skips them; rate limits are still counted on every request. Only a
        # key that was verified in full (constant-time) is ever stored, so a lookup here needs
        # the exact key text, and its time tells nothing about other keys.
        self._admitted: dict[tuple[str | None, ...], _Admitted] = {}
        # per (peer, X-Forwarded-For): the client's address, and the server allow-list's answer
        self._peers: dict[tuple[str | None, str | None], tuple[str | None, bool, Address | None]] = {}

        self.active = bool(self.auth or self.audit or self._allow or self._rate_ip)

    def close(self) -> None:
        if self.keys is not None:
            self.keys.close()
        if self.audit is not None:
            self.audit.close()

    async def start(self) -> None:
        """Start the audit writer process (server start-up; without it, entries are committed on
        the event loop)."""
        if self.commits is not None and self._secret is not None:
            await self.commits.start(self._secret, self.settings.data_dir, self.settings.audit_fsync)

    async def aclose(self) -> None:
        """Commit what is queued, stop the audit writer, close the stores."""
        if self.commits is not None:
            await self.commits.close()
        self.close()

    def spec_for(self, model: str | None) -> ModelSpec | None:
        """The serving spec of a model (for policy and PII rules), or None when it is not serving."""
        if model is None or self.manager is None:
            return None
        return self.manager.serving_spec(model)

    # ---- admission ------------------------------------------------------------------------------
    def admit(self, call: Call) -> None:
        """Raise 4001 / 4003 / 4029 when the call may not proceed; fill in its key and address.
        Synchronous; a caller admitted before skips the key checks (see ``_admitted``)."""
        peer = self._peer(call.peer, call.forwarded_for)
        call.client_ip = peer[0]
        if call.scope == "open":
            return
        if self.commits is not None and not call.in_flight:
            call.in_flight = True
            self.commits.in_flight += 1
        if not peer[1]:
            raise ForbiddenError(f"Requests from {call.client_ip} are not allowed by this server's IP allow-list.")
        if self._rate_ip:
            self._limiter.check(self._rate_ip, f"ip:{call.client_ip}", f"client address {call.client_ip}")
        keys = self.keys
        if not self.auth or keys is None:
            return
        caller = (call.credential, call.peer, call.forwarded_for, call.scope, call.model)
        memo = self._admitted.get(caller)
        if memo is None or memo.generation != keys.generation() or (
                memo.expires_at is not None and memo.expires_at <= time.time()):
            memo = self._check_key(call, keys, peer[2])
            if len(self._admitted) >= 4096:  # many distinct callers: start over rather than grow
                self._admitted.clear()
            self._admitted[caller] = memo
        call.key = memo.key
        if memo.rate:
            self._limiter.check(memo.rate, memo.bucket, memo.who)

    def _check_key(self, call: Call, keys: KeyStore, addr: Address | None) -> _Admitted:
        """Every check of the caller's key that does not count requests; what passed, to remember."""
        generation = keys.generation()
        key = self._authenticate(keys, call.credential)
        call.key = key
        if key.allow_ips and not in_networks(addr, key.allow_ips):
            raise ForbiddenError(f"API key {key.key_id} may not be used from {call.client_ip}.")
        if call.scope != "any" and call.scope not in key.scopes:
            raise ForbiddenError(f"API key {key.key_id} lacks the '{call.scope}' scope needed for '{call.action}' "
                                 f"(it has: {', '.join(sorted(key.scopes))}).")
        self.check_model(call, call.model)
        return _Admitted(generation, key, key.expires_at, key.rate or self._rate_key, f"key:{key.key_id}",
                         f"API key {key.key_id}")

    def _peer(self, peer: str | None, forwarded_for: str | None) -> tuple[str | None, bool, Address | None]:
        """(client address as text, admitted by the server's allow-list, the address) for a
        connection's peer and X-Forwarded-For; remembered per pair (the same few recur)."""
        known = self._peers.get((peer, forwarded_for))
        if known is not None:
            return known
        addr = self._resolver.resolve(peer, forwarded_for)
        text = address_text(addr) if addr is not None else peer
        allowed = not self._allow or in_networks(addr, self._allow)
        if len(self._peers) >= 4096:  # many distinct clients: start over rather than grow
            self._peers.clear()
        known = self._peers[(peer, forwarded_for)] = (text, allowed, addr)
        return known

    def check_model(self, call: Call, model: str | None) -> None:
        """Called again by adapters that learn the model only from the request body."""
        call.model = model or call.model
        key = call.key
        if key is not None and key.models is not None and model is not None and model not in key.models:
            raise ForbiddenError(f"API key {key.key_id} may not use model '{model}'.")

    def check_all_models(self, call: Call) -> None:
        """A request about every model at once (all models' statistics): not for a key limited to some."""
        key = call.key
        if key is not None and key.models is not None:
            raise ForbiddenError(f"API key {key.key_id} may use only models {sorted(key.models)}; ask about one "
                                 "of them by name.")

    @staticmethod
    def _authenticate(keys: KeyStore, credential: str | None) -> ApiKey:
        if not credential:
            raise UnauthenticatedError(
                "This server requires an API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                "(gRPC: 'authorization' metadata).", headers={"WWW-Authenticate": "Bearer"})
        key = keys.lookup(credential)
        if key is None:
            raise UnauthenticatedError("The API key is not valid.", headers={"WWW-Authenticate": "Bearer"})
        if key.revoked_at is not None:
            raise UnauthenticatedError(f"API key {key.key_id} has been revoked.",
                                       headers={"WWW-Authenticate": "Bearer"})
        if key.expires_at is not None and key.expires_at <= time.time():
            raise UnauthenticatedError(f"API key {key.key_id} has expired.", headers={"WWW-Authenticate": "Bearer"})
        return key

    # ---- audit ------------------------------------------------------------------------------------
    def record(self, call: Call, status: int | None, code: int | None, error: str | None = None) -> Awaitable[None]:
        """Commit the audit entry for a call (once): await what this returns before the response
        goes out. If the audit log cannot be written this (or the awaitable) raises: the request
        fails rather than go unrecorded."""
        commits = self.commits
        if call.in_flight and commits is not None:
            call.in_flight = False
            commits.in_flight -= 1
        if call.recorded or commits is None or call.scope == "open":
            return DONE
        call.recorded = True
        detail = {**call.detail, "error": error[:500]} if error else dict(call.detail) if call.detail else None
        # Committed at once when this is the only request in flight, else by the audit writer
        # process together with the entries of the other requests finishing meanwhile
        # (GroupCommitter).
        key = call.key
        return commits.commit(AuditEntry(
            call.action, call.transport, key.key_id if key is not None else None, call.model, call.version,
            call.client_ip, status, code, (time.perf_counter() - call.started) * 1000,
            call.request_id if _REQUEST_ID.match(call.request_id) else redact(call.request_id), call.trace_id,
            detail, time.time()))
