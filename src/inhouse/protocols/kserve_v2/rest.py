"""KServe Open Inference Protocol v2 over REST, with the model-repository extension.
Routes parse, call the data plane, and render; nothing else."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from inhouse.core.dataplane import DataPlane, parse_version
from inhouse.core.json_doc import json_object
from inhouse.core.load_params import load_overrides
from inhouse.core.manager import IndexEntry
from inhouse.core.types import InferRequest
from inhouse.errors import InvalidRequestError
from inhouse.protocols.cache_scope import headers_tenant
from inhouse.protocols.http_body import cancel_on_disconnect, read_body
from inhouse.protocols.kserve_v2.json_wire import HEADER_LENGTH, dumps, parse_infer_request, render_infer_response
from inhouse.security.pipeline import READINESS, Guard, TextFn, Texts, guarded

_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8",
                                                 "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"description": "row-major flat or nested list"},
    },
}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object", "description": "priority, timeout (µs), timeout_ms, "
                               "binary_data_output"},
                "inputs": {"type": "array", "items": _TENSOR_SCHEMA, "minItems": 1},
                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"}, "parameters": {"type": "object"}}}},
            },
        }}},
    },
}
_LOAD_DOC: dict[str, Any] = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object",
        "properties": {"parameters": {"type": "object", "properties": {
            "config": {"type": "string", "description": "JSON object merged over model.yaml for this load"}}}},
    }}}},
}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _index_doc(e: IndexEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": e.name, "state": str(e.state), "reason": e.reason}
    if e.version is not None:
        doc["version"] = str(e.version)
    if e.code is not None:
        doc["code"] = e.code
    return doc


def parse_rest_infer(body: bytes, header_length: str | None, priority: str | None, model: str,
                     version: str | None) -> InferRequest:
    """A v2 REST infer request (JSON, or JSON header + binary tensors), with the priority an
    ``Inhouse-Priority`` header gives when the body names none."""
    req = parse_infer_request(body, header_length, model, parse_version(version))
    if priority is not None and req.priority is None:
        if not priority.isdigit():
            raise InvalidRequestError("Header Inhouse-Priority must be a non-negative integer.")
        req.priority = int(priority)
    return req


def infer_request(dataplane: DataPlane, body: bytes, header_length: str | None, priority: str | None, model: str,
                  version: str | None) -> InferRequest:
    """The one v2 REST infer request parser, whatever carried the request (the routed endpoint,
    the ASGI entry, the HTTP fast path): a request refused here counts in the model's failure
    statistics. The caller then awaits ``dataplane.infer`` and renders with
    ``render_infer_response`` (no coroutine of its own: the fast path's cost is per call)."""
    try:
        return parse_rest_infer(body, header_length, priority, model, version)
    except Exception as exc:
        dataplane.infer_rejected(model, exc)
        raise


async def infer_response(dataplane: DataPlane, request: Request, model: str, version: str | None,
                         max_request_bytes: int) -> Response:
    """POST /v2/models/{model}[/versions/{version}]/infer through the web framework. A server
    answers these routes in ``transports/http/infer_entry.py`` before the framework sees them; this
    route serves the app when it is mounted on its own, and documents the API."""
    try:
        body = await read_body(request, max_request_bytes)
    except Exception as exc:
        dataplane.infer_rejected(model, exc)
        raise
    req = infer_request(dataplane, body, request.headers.get(HEADER_LENGTH), request.headers.get(PRIORITY_HEADER),
                        model, version)
    req.cache_tenant = headers_tenant(request.headers)
    resp = await cancel_on_disconnect(request.receive, dataplane.infer(req))
    content, headers = render_infer_response(resp, req)
    return Response(content, headers=headers)


PRIORITY_HEADER = "inhouse-priority"
INFER_PATH = "/v2/models/{model}/infer"
INFER_VERSION_PATH = "/v2/models/{model}/versions/{version}/infer"


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) of an infer path, or None for any other path."""
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def _map_nested(value: Any, fn: TextFn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_nested(v, fn) for v in value]
    return value


def map_v2_texts(doc: Any, fn: TextFn) -> None:
    """The texts of a v2 infer request: the elements of its BYTES input tensors."""
    tensors = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(tensors, list):
        return
    for t in tensors:
        if isinstance(t, dict) and t.get("datatype") == "BYTES" and "data" in t:
            t["data"] = _map_nested(t["data"], fn)


def cannot_hold_text(body: bytes) -> bool:
    """Whether a v2 infer JSON body certainly has no BYTES tensor, so text rules find nothing in
    it and it need not be parsed for them (the v2 parser reads it next): no ``BYTES`` in it, and
    no escape at all (a ``\\u`` escape could spell one). Only BYTES tensors may carry text."""
    return b"BYTES" not in body and b"\\" not in body  # one byte: a memchr, not a substring search


V2_INFER_TEXTS = Texts(request=map_v2_texts, skip=cannot_hold_text)
INFER_GUARD = Guard("infer", "infer", model="path", texts=V2_INFER_TEXTS)
_METADATA, _READY, _CONFIG = (Guard(f"model.{what}", "infer", model="path") for what in ("metadata", "ready", "config"))


def build_router(dataplane: DataPlane, max_request_bytes: int) -> APIRouter:
    router = APIRouter(tags=["KServe v2"])

    async def optional_json(request: Request) -> dict[str, Any]:
        body = await read_body(request, max_request_bytes)
        if not body.strip():
            return {}
        return json_object(body)

    @router.get("/v2", summary="Server metadata")
    @guarded(Guard("server.metadata", "infer"))
    async def server_metadata() -> Response:
        return _json(dataplane.server_metadata())

    @router.get("/v2/health/live", summary="Liveness")
    @guarded(Guard("health.live", "open"))
    async def health_live() -> Response:
        return _json({"live": True})

    @router.get("/v2/health/ready", summary="Readiness")
    @router.get("/health/ready", summary="Readiness", tags=["health"])
    @guarded(READINESS)
    async def health_ready() -> Response:
        ready = dataplane.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    @router.get("/v2/models/stats", summary="Inference statistics of every serving model")
    @router.get("/v2/models/{model}/stats", summary="Inference statistics of a model")
    @router.get("/v2/models/{model}/versions/{version}/stats", summary="Inference statistics of a model version")
    @guarded(Guard("model.stats", "infer", model="path", every_model=True))
    async def model_statistics(model: str = "", version: str | None = None) -> Response:
        return _json({"model_stats": dataplane.model_statistics(model, parse_version(version))})

    @router.get("/v2/models/{model}", summary="Model metadata")
    @router.get("/v2/models/{model}/versions/{version}", summary="Model version metadata")
    @guarded(_METADATA)
    async def model_metadata(model: str, version: str | None = None) -> Response:
        return _json(dataplane.model_metadata(model, parse_version(version)))

    @router.get("/v2/models/{model}/ready", summary="Model readiness")
    @router.get("/v2/models/{model}/versions/{version}/ready", summary="Model version readiness")
    @guarded(_READY)
    async def model_ready(model: str, version: str | None = None) -> Response:
        v = parse_version(version)
        ready = dataplane.model_ready(model, v)
        if not ready:
            dataplane.manager.repository.model_dir(model)  # unknown → 404
        return _json({"name": model, "ready": ready}, 200 if ready else 503)

    @router.get("/v2/models/{model}/config", summary="Effective model spec")
    @router.get("/v2/models/{model}/versions/{version}/config", summary="Effective model spec of a version")
    @guarded(_CONFIG)
    async def model_config(model: str, version: str | None = None) -> Response:
        return _json(dataplane.model_config(model, parse_version(version)))

    @router.post(INFER_PATH, summary="Inference", openapi_extra=_INFER_DOC)
    @router.post(INFER_VERSION_PATH, summary="Inference on a version",
                 openapi_extra=_INFER_DOC)
    @guarded(INFER_GUARD)
    async def infer(request: Request, model: str, version: str | None = None) -> Response:
        return await infer_response(dataplane, request, model, version, max_request_bytes)

    @router.post("/v2/repository/index", summary="Repository index")
    @guarded(Guard("repository.index", "admin"))
    async def repository_index(request: Request) -> Response:
        doc = await optional_json(request)
        ready_only = bool(doc.get("ready", False))
        return _json([_index_doc(e) for e in dataplane.repository_index(ready_only)])

    @router.post("/v2/repository/models/{model}/load", summary="Load or reload a model", openapi_extra=_LOAD_DOC)
    @guarded(Guard("repository.load", "admin", model="path"))
    async def repository_load(request: Request, model: str) -> Response:
        doc = await optional_json(request)
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidRequestError("'parameters' must be a JSON object.")
        overrides = load_overrides(params, "parameters.config")
        versions = await dataplane.load_model(model, overrides)
        return _json({"name": model, "versions": [str(v.version) for v in versions], "state": "READY"})

    @router.post("/v2/repository/models/{model}/unload", summary="Unload a model")
    @guarded(Guard("repository.unload", "admin", model="path"))
    async def repository_unload(request: Request, model: str) -> Response:
        await optional_json(request)
        versions = await dataplane.unload_model(model)
        return _json({"name": model, "versions": [str(v.version) for v in versions], "state": "UNLOADED"})

    @router.get("/health", summary="Overall health, for humans and load balancers", tags=["health"])
    @guarded(READINESS)
    async def health() -> Response:
        # no model names: readiness is open to callers without a key (open_readiness)
        ready = dataplane.ready()
        return _json({"status": "ok" if ready else "starting", "live": True, "ready": ready}, 200 if ready else 503)

    return router
