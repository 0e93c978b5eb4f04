"""``/console``: the page, its assets, and its own small JSON endpoints (session, live metrics,
audit query / verify / export, doctor findings). Everything else the console shows comes from the
server's public APIs, through the same security pipeline as any other client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import Response

from inhouse.console.snapshot import snapshot
from inhouse.core.dataplane import DataPlane
from inhouse.doctor import DoctorOptions, run_checks
from inhouse.errors import InvalidRequestError, RouteNotFoundError, UnauthenticatedError
from inhouse.observability.endpoint import Families
from inhouse.security.audit import AuditLog
from inhouse.security.gate import SecurityGate
from inhouse.security.pipeline import Guard, credential, guarded
from inhouse.settings import ServerSettings

_NO_STORE = {"Cache-Control": "no-store"}
_ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_PAGE = Guard("console.page", "open")  # the page asks for the key; it holds no data itself
_AUDIT_LIMIT = 1000
ALL_SCOPES = ["admin", "infer", "metrics"]


def _respond(body: bytes, media_type: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=media_type, headers={**_NO_STORE, **(headers or {})})


def _json(obj: Any, status: int = 200) -> Response:
    return _respond(orjson.dumps(obj), "application/json", status)


def _asset(name: str) -> bytes:
    return resources.files("inhouse.console").joinpath("static", name).read_bytes()


def _float_param(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(f"'{name}' must be a Unix time in seconds, e.g. {time.time():.0f}.") from None


class AuditFilter:
    """The console's audit query: a time range and exact matches on key, model, action and result."""

    def __init__(self, request: Request) -> None:
        q = request.query_params
        self.since = _float_param(request, "since")
        self.until = _float_param(request, "until")
        self.key = q.get("key") or None
        self.model = q.get("model") or None
        self.action = q.get("action") or None
        self.result = q.get("result") or None
        if self.result not in (None, "ok", "error"):
            raise InvalidRequestError("'result' must be 'ok' or 'error'.")

    def matches(self, row: dict[str, Any]) -> bool:
        if self.until is not None and row["ts"] > self.until:
            return False
        if self.key is not None and row.get("key_id") != self.key:
            return False
        if self.model is not None and row.get("model") != self.model:
            return False
        if self.action is not None and row.get("action") != self.action:
            return False
        if self.result is not None:
            status = row.get("status")
            failed = row.get("code") is not None or (isinstance(status, int) and status >= 400)
            if failed != (self.result == "error"):
                return False
        return True

    def rows(self, audit: AuditLog) -> Iterator[dict[str, Any]]:
        for row in audit.entries(self.since):
            if self.matches(row):
                yield row


def build_router(dataplane: DataPlane, settings: ServerSettings, gate: SecurityGate,
                 registry: CollectorRegistry | None, families: Families | None = None) -> APIRouter:
    # the API is in /openapi.json (so schema fuzzing reaches it); the page and its files are not
    router = APIRouter(tags=["console"])

    def audit_log() -> AuditLog:
        if gate.audit is None:
            raise RouteNotFoundError("This server keeps no audit log: start it with --auth (or audit: true).")
        return gate.audit

    @router.get("/console", include_in_schema=False)
    @guarded(_PAGE)
    async def page() -> Response:
        return _respond(_asset("index.html"), "text/html; charset=utf-8")

    @router.get("/console/static/{name}", include_in_schema=False)
    @guarded(_PAGE)
    async def asset(name: str) -> Response:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise RouteNotFoundError(f"The console has no file '{name}'.")
        return _respond(_asset(name), media_type, headers={"Cache-Control": "no-cache"})

    @router.get("/console/api/session")
    @guarded(Guard("console.session", "any"))
    async def session(request: Request) -> Response:
        """Who the caller is: what the console shows depends on the key's scopes (the server
        checks them again on every call)."""
        if gate.keys is None:
            return _json({"auth": False, "audit": gate.audit is not None, "key": None, "scopes": ALL_SCOPES,
                          "models": None})
        given = credential(request.headers.get("authorization"), request.headers.get("x-api-key"))
        key = gate.keys.lookup(given) if given else None
        if key is None:  # the security layer admitted it, so the key was valid a moment ago
            raise UnauthenticatedError("The API key is no longer valid; sign in again.")
        models = sorted(key.models) if key.models is not None else None
        return _json({"auth": True, "audit": gate.audit is not None, "key": {"key_id": key.key_id, "name": key.name},
                      "scopes": sorted(key.scopes), "models": models})

    @router.get("/console/api/metrics")
    @guarded(Guard("console.metrics", "metrics"))
    async def metrics() -> Response:
        if registry is None:
            raise RouteNotFoundError("This server runs without metrics.")
        # with workers, the figures of every worker: the console's page may be served by any one
        return _json(snapshot(await families() if families is not None else registry.collect()))

    @router.get("/console/api/audit")
    @guarded(Guard("console.audit", "admin"))
    async def audit_query(request: Request) -> Response:
        audit, wanted = audit_log(), AuditFilter(request)
        rows = list(wanted.rows(audit))
        return _json({"entries": rows[-_AUDIT_LIMIT:][::-1], "matched": len(rows), "limit": _AUDIT_LIMIT})

    @router.get("/console/api/audit/verify")
    @guarded(Guard("console.audit.verify", "admin"))
    async def audit_verify() -> Response:
        report = audit_log().verify()
        return _json({"ok": report.ok, "entries": report.entries, "first_seq": report.first_seq,
                      "last_seq": report.last_seq, "problems": report.problems[:50]})

    @router.get("/console/api/audit/export")
    @guarded(Guard("console.audit.export", "admin"))
    async def audit_export(request: Request) -> Response:
        audit, wanted = audit_log(), AuditFilter(request)
        body = b"".join(orjson.dumps(row) + b"\n" for row in wanted.rows(audit))
        return _respond(body, "application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="inhouse-audit.jsonl"'})

    @router.get("/console/api/doctor")
    @guarded(Guard("console.doctor", "admin"))
    async def doctor() -> Response:
        options = DoctorOptions(settings, dataplane.manager.repository.root, check_ports=False)
        findings = await asyncio.to_thread(run_checks, options)
        return _json([{"area": f.area, "severity": f.severity.name, "message": f.message, "fix": f.fix}
                      for f in findings])

    return router
