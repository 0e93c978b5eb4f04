"""The authentication matrix: every HTTP route the app mounts and every RPC the servicers
declare (``RPC_GUARDS``), each called with every kind of bad credential, and the answer compared
with what its declared guard says it must be. Used by tests/test_auth_matrix.py (against an
in-process server) and by bench/faults/case_abuse.py (against ``inhouse serve`` processes).

Credential cases: ``none``, ``wrong`` (a well-formed key nobody issued), ``revoked``,
``expired`` (401 / UNAUTHENTICATED); ``scope`` (a key without the route's scope), ``model`` (a
key limited to another model, on a route or RPC naming a model or asking about every model) and
``address`` (a key bound to other addresses) (403 / PERMISSION_DENIED). A route open to all, or a
case its guard does not refuse, must not be refused (nor fail with a 5xx / INTERNAL)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import message_factory
from starlette.routing import BaseRoute, Route

from inhouse.security.keys import KeyStore
from inhouse.security.pipeline import Guard, guard_of

CASES = ("none", "wrong", "revoked", "expired", "scope", "model", "address")
# path parameters filled so the route matches a model the server serves
PARAMS = {"model": "add", "version": "1", "key_id": "no-such-key", "response_id": "resp_none", "name": "app.js"}
_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
_STATUS = {401: (grpc.StatusCode.UNAUTHENTICATED, "4001"), 403: (grpc.StatusCode.PERMISSION_DENIED, "4003")}


@dataclass(frozen=True)
class Credentials:
    keys: dict[str, str | None]  # case → the key presented (None: no key)
    scope_keys: dict[str, str]  # scope → a key with only that scope

    def for_case(self, case: str, scope: str) -> str | None:
        if case == "scope":  # a key lacking the route's scope (any valid key passes 'any')
            return self.scope_keys["metrics" if scope == "infer" else "infer"]
        return self.keys[case]


def make_credentials(data_dir: Path) -> Credentials:
    """The keys of every case, in the key store the server will open."""
    store = KeyStore(data_dir)
    try:
        every = ["infer", "admin", "metrics"]
        revoked = store.create("revoked", every)[0]
        store.revoke("revoked")
        keys: dict[str, str | None] = {
            "none": None,
            "wrong": "ih_0000000000000000_" + "x" * 43,
            "revoked": revoked,
            "expired": store.create("expired", every, expires_at=time.time() - 60)[0],
            "model": store.create("other-model", every, models=["other"])[0],
            "address": store.create("elsewhere", every, allow_ips=["10.0.0.0/8"])[0],
            "good": store.create("good", every)[0],
        }
        scope_keys = {s: store.create(f"only-{s}", [s])[0] for s in every}
    finally:
        store.close()
    return Credentials(keys, scope_keys)


def expected(guard: Guard, case: str, open_readiness: bool = True) -> int | None:
    """The status the case must get on a route or RPC with this guard; None: not refused."""
    scope = guard.scope
    if scope == "readiness":
        scope = "open" if open_readiness else "metrics"
    if scope == "open":
        return None
    if case in ("none", "wrong", "revoked", "expired"):
        return 401
    if case == "scope":
        return None if scope == "any" else 403
    if case == "model":
        return 403 if guard.model is not None or guard.every_model else None
    return 403  # address


# ---- HTTP ---------------------------------------------------------------------------------------
def routes(app_routes: Iterable[BaseRoute]) -> Iterator[Route]:
    for route in app_routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from routes(included.routes)
        elif isinstance(route, Route):
            yield route


def http_calls(app_routes: Iterable[BaseRoute]) -> list[tuple[str, str, Guard]]:
    calls = []
    for route in routes(app_routes):
        guard = guard_of(route.endpoint)
        if guard is None:
            raise AssertionError(f"{route.path} declares no guard")
        path = _PARAM.sub(lambda m: PARAMS.get(m.group(1), "x"), route.path)
        for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
            calls.append((method, path, guard))
    return calls


def _verdict(status: int, code: str | None, want: int | None) -> bool:
    if want is None:
        return status not in (401, 403) and status < 500
    return status == want and code == _STATUS[want][1]


def run_http(url: str, calls: list[tuple[str, str, Guard]], creds: Credentials,
             cases: Iterable[str] = CASES, extra_headers: dict[str, str] | None = None,
             want_all: int | None = None) -> tuple[int, list[str]]:
    """(calls made, the unexpected ones). ``want_all``: every non-open call must get this
    (a server whose allow-list excludes the caller)."""
    bad: list[str] = []
    n = 0
    with httpx.Client(base_url=url, timeout=30) as c:
        for case in cases:
            for method, path, guard in calls:
                key = creds.for_case(case, guard.scope)
                headers = dict(extra_headers or {})
                if key is not None:
                    headers["authorization"] = f"Bearer {key}"
                body = {"model": "add"} if method in ("POST", "PUT", "PATCH", "DELETE") else None
                r = c.request(method, path, json=body, headers=headers)
                n += 1
                want = expected(guard, case)
                if want_all is not None and (want is not None or guard.scope == "any"):
                    want = want_all
                if not _verdict(r.status_code, r.headers.get("inhouse-error-code"), want):
                    bad.append(f"{case}: {method} {path} -> {r.status_code} {r.text[:120]} "
                               f"(want {want or 'not refused'})")
    return n, bad


# ---- gRPC ---------------------------------------------------------------------------------------
def rpc_calls() -> list[tuple[str, Guard, Any, bool, bool]]:
    """(full method, guard, request message class, client streaming, server streaming) of
    every declared RPC."""
    from grpc_health.v1 import health_pb2

    from inhouse.protocols.proto import grpc_service_pb2, openclaw_model_service_pb2
    from inhouse.transports.grpc.security import declared_rpcs

    services = {}
    for mod in (grpc_service_pb2, openclaw_model_service_pb2, health_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            services[svc.full_name] = svc
    out = []
    for method, guard in sorted(declared_rpcs().items()):
        service, _, name = method.strip("/").partition("/")
        desc = services[service].methods_by_name[name]
        out.append((method, guard, message_factory.GetMessageClass(desc.input_type),
                    desc.client_streaming, desc.server_streaming))
    return out


def grpc_request(cls: Any, guard: Guard) -> bytes:
    msg = cls()
    if guard.model is not None and guard.model != "path":
        setattr(msg, guard.model, "add")
    if hasattr(msg, "inputs") and hasattr(msg, "model_name"):  # a ModelInfer the model refuses after auth
        msg.model_name = "add"
    return bytes(msg.SerializeToString())


def call_rpc(channel: grpc.Channel, method: str, request: bytes, client_streaming: bool,
             server_streaming: bool, key: str | None, timeout: float = 5) -> grpc.StatusCode:
    """The status one call ends with (OK when it answered; a stream that keeps answering, OK)."""
    md = (("authorization", f"Bearer {key}"),) if key is not None else ()
    ident = {"request_serializer": None, "response_deserializer": None}
    try:
        if client_streaming and server_streaming:
            it = channel.stream_stream(method, **ident)(iter([request]), metadata=md, timeout=timeout)
            for _ in it:
                break
        elif server_streaming:
            it = channel.unary_stream(method, **ident)(request, metadata=md, timeout=timeout)
            for _ in it:
                break
            it.cancel()
        else:
            channel.unary_unary(method, **ident)(request, metadata=md, timeout=timeout)
    except grpc.RpcError as err:
        code: grpc.StatusCode = err.code()
        return code
    return grpc.StatusCode.OK


def run_grpc(target: str, creds: Credentials, cases: Iterable[str] = CASES,
             want_all: int | None = None) -> tuple[int, list[str]]:
    bad: list[str] = []
    n = 0
    refusals = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    failures = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
    with grpc.insecure_channel(target) as channel:
        for case in cases:
            for method, guard, cls, cs, ss in rpc_calls():
                code = call_rpc(channel, method, grpc_request(cls, guard), cs, ss, creds.for_case(case, guard.scope))
                n += 1
                want = expected(guard, case)
                if want_all is not None and (want is not None or guard.scope == "any"):
                    want = want_all
                ok = code not in refusals | failures if want is None else code == _STATUS[want][0]
                if not ok:
                    wanted = _STATUS[want][0].name if want else "not refused"
                    bad.append(f"{case}: {method} -> {code.name} (want {wanted})")
    return n, bad
