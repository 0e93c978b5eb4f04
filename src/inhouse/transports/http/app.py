"""The HTTP application: every REST protocol adapter mounted on one FastAPI app."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response

from inhouse import __version__
from inhouse.console import routes as console
from inhouse.console.headers import ConsoleHeaders
from inhouse.core.dataplane import DataPlane
from inhouse.errors import InvalidRequestError, RouteNotFoundError
from inhouse.llm.service import LLMService
from inhouse.observability.access import ObservabilityMiddleware
from inhouse.observability.endpoint import build_metrics_router
from inhouse.observability.setup import HttpObservability
from inhouse.protocols import anthropic, keys_admin, ollama, openai, openai_responses
from inhouse.protocols.errors import ErrorResponses, error_renderer
from inhouse.protocols.kserve_v2 import generate_rest, rest
from inhouse.security.gate import SecurityGate
from inhouse.settings import ServerSettings
from inhouse.transports.http.security import SecurityMiddleware, guard_docs


def build_app(dataplane: DataPlane, settings: ServerSettings, *, llm: LLMService, gate: SecurityGate,
              observability: HttpObservability | None = None) -> FastAPI:
    """The app over the services the server built. Without ``observability`` there is no
    ``/metrics`` route and no request metrics, tracing or access log (an app mounted on its own)."""
    app = FastAPI(
        title="inhouse",
        version=__version__,
        description="Self-hosted inference server: KServe v2 (REST and gRPC), OpenAI- and "
        "Anthropic-compatible APIs.",
        docs_url="/docs",
        redoc_url=None,
    )
    # FastAPI tries the routes in this order, at a few microseconds each: the LLM APIs first, since
    # v2 infer (the KServe hot path) is answered before this app (see below)
    app.include_router(openai.build_router(llm, settings.max_request_bytes, settings.llm_stream_usage,
                                           ready=dataplane.ready))
    app.include_router(anthropic.build_router(llm, settings.max_request_bytes))
    app.include_router(openai_responses.build_router(llm, settings.max_request_bytes))
    app.include_router(ollama.build_router(llm, dataplane.manager, settings.max_request_bytes))
    app.include_router(rest.build_router(dataplane, settings.max_request_bytes))
    app.include_router(generate_rest.build_router(dataplane, llm, settings.max_request_bytes))
    if observability is not None:
        app.include_router(build_metrics_router(observability.registry, observability.exposition))

    # Routes raise; these render, in the format error_renderer picks for the path.
    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, StarletteHTTPException):
            raise TypeError(f"http_error got {type(exc).__name__}") from exc
        render = error_renderer(request.url.path)
        if exc.status_code == 404:
            return render(RouteNotFoundError(no_such_endpoint(app, request.method, request.url.path)))
        if exc.status_code == 405:
            err = InvalidRequestError(f"Method {request.method} is not allowed on {request.url.path}.")
            resp = render(err)
            resp.status_code = 405
            return resp
        return render(InvalidRequestError(str(exc.detail)))

    async def validation_error(request: Request, exc: Exception) -> Response:
        return error_renderer(request.url.path)(InvalidRequestError(f"Invalid request: {exc}"))

    async def unhandled(request: Request, exc: Exception) -> Response:
        return error_renderer(request.url.path)(exc)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unhandled)  # the last resort: what a middleware itself raises
    app.add_middleware(ErrorResponses)  # added first, so innermost: every route's InhouseError and the rest
    if settings.gzip_min_bytes > 0:
        # streams of events (SSE, Ollama's NDJSON) must reach the client as they come, not in zlib's blocks
        app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_min_bytes,
                           exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, "application/x-ndjson"))
    # v2 infer, the hot path, is answered before this app by transports/http/infer_entry.py (the server
    # puts it in front); its routes here serve the app when it is mounted on its own.
    app.include_router(keys_admin.build_router(gate, settings.max_request_bytes))
    app.include_router(console.build_router(dataplane, settings, gate,
                                            observability.registry if observability is not None else None,
                                            observability.families if observability is not None else None))
    app.add_middleware(SecurityMiddleware, gate=gate, max_request_bytes=settings.max_request_bytes)
    app.add_middleware(ConsoleHeaders)  # the console's CSP and framing rules, on its refusals too
    # outermost, added last: even requests the security layer rejects are measured and logged
    if observability is not None:
        app.add_middleware(ObservabilityMiddleware, http_metrics=observability.http_metrics,
                           tracer=observability.tracer, access_log_enabled=observability.access_log,
                           log_client_address=observability.log_client_address,
                           access_log_sample=observability.access_log_sample)
    guard_docs(app)
    return app


def no_such_endpoint(app: FastAPI, method: str, path: str) -> str:
    """What an unknown route answers: the routes served under the same first path segment (an
    agent with a wrong base URL or API flavour sees what to call instead), or the segments."""
    try:
        paths: dict[str, Any] = app.openapi().get("paths", {})
    except Exception:  # a schema that cannot be built must not turn a 404 into a 500
        paths = {}
    routes = [(m.upper(), p) for p, ops in paths.items() for m in ops if m != "parameters"]
    top = path.strip("/").split("/", 1)[0]
    near = [f"{m} {p}" for m, p in routes if p.strip("/").split("/", 1)[0] == top]
    if near:
        served = f"these under /{top}: {', '.join(near)}"
    else:
        served = "routes under " + ", ".join(sorted({"/" + p.strip("/").split("/", 1)[0] for _, p in routes}))
    return f"No such endpoint: {method} {path}. inhouse serves {served}; the full list is at /docs."
