"""API-key management over REST (scope ``admin``, and only with ``--auth``): list, create
(the key is in the response once) and revoke. Routes translate; the key store decides."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import ForbiddenError, InvalidRequestError, ModelNotFoundError
from inhouse.protocols.http_body import read_body
from inhouse.security.gate import SecurityGate
from inhouse.security.keys import KeySpecError, KeyStore
from inhouse.security.pipeline import Guard, guarded

_CREATE_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["name", "scopes"],
    "properties": {
        "name": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string", "enum": ["infer", "admin", "metrics"]}},
        "models": {"type": "array", "items": {"type": "string"}},
        "rate": {"type": "string", "description": "e.g. 200/s"},
        "allow_ips": {"type": "array", "items": {"type": "string"}},
        "expires_at": {"type": "number", "description": "Unix time"},
    }}}}}}


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _str_list(doc: dict[str, Any], field: str) -> list[str] | None:
    value = doc.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"'{field}' must be a list of strings.")
    return value


def build_router(gate: SecurityGate, max_request_bytes: int) -> APIRouter:
    router = APIRouter(tags=["security"])

    def store() -> KeyStore:
        if gate.keys is None:
            raise ForbiddenError("API keys can be managed over the API only when the server runs with --auth; "
                                 "use 'inhouse keys' on the server.")
        return gate.keys

    @router.get("/v2/security/keys", summary="List API keys (never the keys themselves)")
    @guarded(Guard("keys.list", "admin"))
    async def list_keys() -> Response:
        return _json([k.public() for k in store().list()])

    @router.post("/v2/security/keys", summary="Create an API key (returned once)", openapi_extra=_CREATE_DOC)
    @guarded(Guard("keys.create", "admin"))
    async def create_key(request: Request) -> Response:
        keys = store()
        try:
            doc = orjson.loads(await read_body(request, max_request_bytes))
        except orjson.JSONDecodeError as err:
            raise InvalidRequestError(f"Request body is not valid JSON: {err}.") from None
        if not isinstance(doc, dict):
            raise InvalidRequestError("Request body must be a JSON object.")
        name, rate, expires = doc.get("name"), doc.get("rate"), doc.get("expires_at")
        if not isinstance(name, str):
            raise InvalidRequestError("'name' must be a string.")
        if rate is not None and not isinstance(rate, str):
            raise InvalidRequestError("'rate' must be a string such as 200/s.")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
            raise InvalidRequestError("'expires_at' must be a Unix time in seconds.")
        try:
            key, rec = keys.create(name, _str_list(doc, "scopes") or [], models=_str_list(doc, "models"),
                                   allow_ips=_str_list(doc, "allow_ips") or [], rate=rate,
                                   expires_at=float(expires) if expires is not None else None)
        except (KeySpecError, ValueError) as err:
            raise InvalidRequestError(str(err)) from None
        return _json({"key": key, **rec.public()}, 201)

    @router.delete("/v2/security/keys/{key_id}", summary="Revoke an API key (by key id or name)")
    @guarded(Guard("keys.revoke", "admin"))
    async def revoke_key(key_id: str) -> Response:
        ids = store().revoke(key_id)
        if not ids:
            raise ModelNotFoundError(f"No active API key has id or name '{key_id}'.")
        return _json({"revoked": ids})

    return router
