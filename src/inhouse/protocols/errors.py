"""Where inhouse errors become wire errors, once for every transport: one renderer per wire
format (KServe v2 JSON, OpenAI, Anthropic, Ollama, gRPC status with rich details), all fed from the
error classes in ``inhouse/errors.py``. Routes and RPCs raise; these render."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inhouse.errors import InhouseError, InternalError

if TYPE_CHECKING:
    import grpc
    import grpc.aio

log = logging.getLogger(__name__)

ERROR_CODE_HEADER = "inhouse-error-code"
ERROR_DOMAIN = "inhouse"


def as_inhouse_error(exc: BaseException) -> InhouseError:
    """Any exception as an InhouseError; unknown ones become a generic 9000 whose message
    carries only a reference id (the details go to the log)."""
    if isinstance(exc, InhouseError):
        return exc
    ref = uuid.uuid4().hex[:12]
    log.error("unhandled error", exc_info=exc, extra={"error_ref": ref})
    return InternalError(f"Internal server error (reference {ref}); the server log has the details.")


def error_headers(err: InhouseError) -> dict[str, str]:
    """The headers every HTTP error carries: our code, and the error's hints (``Retry-After``,
    ``WWW-Authenticate``)."""
    return {ERROR_CODE_HEADER: str(err.code), **err.headers}


# ---- bodies, for responses and for errors reported in-band in a stream ------------------------
def v2_error_body(err: InhouseError) -> dict[str, Any]:
    return {"error": str(err)}


def openai_error_body(err: InhouseError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.details.get("param"),
                      "code": str(err.code)}}


_ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "rate_limit_error"}


def anthropic_error_body(err: InhouseError) -> dict[str, Any]:
    """https://docs.anthropic.com/en/api/errors: ``{"type": "error", "error": {type, message}}``."""
    kind = err.openai_type if err.openai_type in _ANTHROPIC_TYPES else "api_error"
    if err.http_status == 413:
        kind = "request_too_large"
    return {"type": "error", "error": {"type": kind, "message": f"[{err.code}] {err.message}"}}


def ollama_error_body(err: InhouseError) -> dict[str, Any]:
    """https://github.com/ollama/ollama/blob/main/docs/api.md#errors: ``{"error": "..."}``, the
    plain message (the code travels in the header), with the HTTP status of our table."""
    return {"error": err.message}


# ---- HTTP responses ---------------------------------------------------------------------------
def v2_error_parts(exc: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The v2 error as (status, raw headers, body): what both the Starlette response and the hot
    infer path, which writes its HTTP replies itself, send."""
    err = as_inhouse_error(exc)
    body = orjson.dumps(v2_error_body(err))
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error_headers(err).items()]
    headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    return err.http_status, headers, body


def v2_error_response(exc: BaseException) -> Response:
    status, headers, body = v2_error_parts(exc)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


def _json_error(body: Callable[[InhouseError], dict[str, Any]]) -> Callable[[BaseException], Response]:
    def render(exc: BaseException) -> Response:
        err = as_inhouse_error(exc)
        return Response(orjson.dumps(body(err)), status_code=err.http_status, media_type="application/json",
                        headers=error_headers(err))
    return render


openai_error_response = _json_error(openai_error_body)
anthropic_error_response = _json_error(anthropic_error_body)
ollama_error_response = _json_error(ollama_error_body)


def error_renderer(path: str) -> Callable[[BaseException], Response]:
    """The error format a client of ``path`` understands: Anthropic's on /v1/messages,
    OpenAI's elsewhere on /v1, Ollama's on /api, KServe v2's everywhere else."""
    if path.startswith("/api/"):
        return ollama_error_response
    if path.startswith("/v1/messages"):
        return anthropic_error_response
    if path.startswith("/v1/") or path == "/v1":
        return openai_error_response
    return v2_error_response


class ErrorResponses:
    """Plain ASGI middleware, innermost: answers an exception a route raised, before its response
    started, in the format :func:`error_renderer` picks for the path. Starlette hands an
    exception with no specific handler to its outermost middleware, past the security and
    access-log middleware, and re-raises it there; answered here, it is audited and logged like
    any other response. A stream that already sent its headers reports errors in-band."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sender)
        except Exception as exc:
            if started:
                raise
            await error_renderer(scope["path"])(exc)(scope, receive, send)


# ---- gRPC -------------------------------------------------------------------------------------
def grpc_error(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The gRPC status, details (``[code] message``) and trailing metadata for any exception:
    our code under ``inhouse-error-code``, hints such as ``retry-after``, and the standard
    rich error model (``grpc-status-details-bin``: google.rpc.Status with an ErrorInfo whose
    metadata holds the code, and a RetryInfo when the client should retry)."""
    import grpc
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    err = as_inhouse_error(exc)
    status = grpc.StatusCode[err.grpc_status]
    details: list[Any] = [error_details_pb2.ErrorInfo(
        reason=_snake(type(err).__name__), domain=ERROR_DOMAIN, metadata={"code": str(err.code)})]
    retry_after = {k.lower(): v for k, v in err.headers.items()}.get("retry-after", "")
    if retry_after.isdigit():
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after))))
    packed = []
    for d in details:
        any_msg = any_pb2.Any()
        any_msg.Pack(d)
        packed.append(any_msg)
    rich = status_pb2.Status(code=status.value[0], message=str(err), details=packed)
    metadata: tuple[tuple[str, str | bytes], ...] = (
        (ERROR_CODE_HEADER, str(err.code)), *((k.lower(), v) for k, v in err.headers.items()),
        ("grpc-status-details-bin", rich.SerializeToString()),
    )
    return status, str(err), metadata


async def grpc_abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the RPC with ``exc`` rendered by :func:`grpc_error`; raises, as ``context.abort`` does.
    Every gRPC refusal and error goes through here, so each carries the same details."""
    code, details, metadata = grpc_error(exc)
    await context.abort(code, details, trailing_metadata=metadata)


_Resp = TypeVar("_Resp")
UnaryHandler = Callable[[Any, Any, "grpc.aio.ServicerContext"], Awaitable[_Resp]]


def grpc_errors(fn: UnaryHandler[_Resp]) -> UnaryHandler[_Resp]:
    """A unary servicer method that raises: whatever it raises ends the RPC through
    :func:`grpc_abort` (every servicer's methods, one rule)."""
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await grpc_abort(context, exc)
            raise  # unreachable: abort raises
    return wrapper


def _snake(name: str) -> str:
    """ShapeError → SHAPE_ERROR (google.rpc.ErrorInfo.reason style)."""
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()
