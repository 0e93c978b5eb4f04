"""Where inhouse errors become wire errors, once for every transport."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from inhouse.errors import InhouseError, InternalError

if TYPE_CHECKING:
    import grpc

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


def _headers(err: InhouseError) -> dict[str, str]:
    return {ERROR_CODE_HEADER: str(err.code), **err.headers}


def v2_error_response(exc: BaseException) -> Response:
    err = as_inhouse_error(exc)
    return Response(orjson.dumps({"error": str(err)}), status_code=err.http_status,
                    media_type="application/json", headers=_headers(err))


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


def _snake(name: str) -> str:
    """ShapeError → SHAPE_ERROR (google.rpc.ErrorInfo.reason style)."""
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(name)).upper()


def openai_error_body(err: InhouseError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.details.get("param"),
                      "code": str(err.code)}}


def openai_error_response(exc: BaseException) -> Response:
    err = as_inhouse_error(exc)
    return Response(orjson.dumps(openai_error_body(err)), status_code=err.http_status,
                    media_type="application/json", headers=_headers(err))


_ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                    "rate_limit_error"}


def anthropic_error_body(err: InhouseError) -> dict[str, Any]:
    """https://docs.anthropic.com/en/api/errors: ``{"type": "error", "error": {type, message}}``."""
    kind = err.openai_type if err.openai_type in _ANTHROPIC_TYPES else "api_error"
    if err.http_status == 413:
        kind = "request_too_large"
    return {"type": "error", "error": {"type": kind, "message": f"[{err.code}] {err.message}"}}


def anthropic_error_response(exc: BaseException) -> Response:
    err = as_inhouse_error(exc)
    return Response(orjson.dumps(anthropic_error_body(err)), status_code=err.http_status,
                    media_type="application/json", headers=_headers(err))


def error_renderer(path: str) -> Callable[[BaseException], Response]:
    """The error format a client of ``path`` understands: Anthropic's on /v1/messages,
    OpenAI's elsewhere on /v1, KServe v2's everywhere else."""
    if path.startswith("/v1/messages"):
        return anthropic_error_response
    if path.startswith("/v1/") or path == "/v1":
        return openai_error_response
    return v2_error_response
