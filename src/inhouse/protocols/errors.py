"""Where inhouse errors become wire errors, once for every transport."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from inhouse.errors import InhouseError, InternalError

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

ERROR_CODE_HEADER = "inhouse-error-code"


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


def grpc_error(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC status, details (``[code] message``) and trailing metadata (our code under
    ``inhouse-error-code``, plus hints such as ``retry-after``) for any exception."""
    import grpc

    err = as_inhouse_error(exc)
    metadata = ((ERROR_CODE_HEADER, str(err.code)), *((k.lower(), v) for k, v in err.headers.items()))
    return grpc.StatusCode[err.grpc_status], str(err), metadata


def openai_error_body(err: InhouseError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.details.get("param"),
                      "code": str(err.code)}}


def openai_error_response(exc: BaseException) -> Response:
    err = as_inhouse_error(exc)
    return Response(orjson.dumps(openai_error_body(err)), status_code=err.http_status,
                    media_type="application/json", headers=_headers(err))
