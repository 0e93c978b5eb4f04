"""Domain errors. Every error inhouse reports has a stable code, an HTTP status and a gRPC
status name; protocol adapters map them once at the edge (see ``protocols/errors.py``)."""

from __future__ import annotations

from typing import Any, ClassVar


class InhouseError(Exception):
    """Base of every error a client may see. ``message`` is a full sentence telling the user
    what went wrong and what to do about it."""

    code: ClassVar[int] = 9000
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"
    openai_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.details = details or {}

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


# 1xxx: models and artefacts
class ModelFormatError(InhouseError):
    code, http_status, grpc_status = 1001, 422, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class ModelNotFoundError(InhouseError):
    code, http_status, grpc_status = 1002, 404, "NOT_FOUND"
    openai_type = "not_found_error"


class ModelNotReadyError(InhouseError):
    code, http_status, grpc_status = 1002, 503, "UNAVAILABLE"
    openai_type = "server_error"


class OutOfMemoryError(InhouseError):
    code, http_status, grpc_status = 1003, 507, "RESOURCE_EXHAUSTED"


class ArtefactIntegrityError(InhouseError):
    code, http_status, grpc_status = 1004, 422, "DATA_LOSS"
    openai_type = "invalid_request_error"


class ModelSpecError(InhouseError):
    """A model.yaml that does not validate, or a model folder that cannot be served as is."""

    code, http_status, grpc_status = 1005, 422, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class ModelLoadError(InhouseError):
    """A load that failed for a reason the backend could not classify more precisely."""

    code, http_status, grpc_status = 1006, 500, "INTERNAL"


class ModelLoadTimeoutError(ModelLoadError):
    """A load (backend load and warm-up) that ran past its ``load.timeout_s`` / ``load_timeout_s``;
    a kind of load failure, so callers catching 1006 catch it too."""

    code, http_status, grpc_status = 1009, 504, "DEADLINE_EXCEEDED"


class ConversionError(InhouseError):
    """A model that ``inhouse convert`` / ``inhouse quantize`` could not convert, or whose
    converted output does not match the original framework's."""

    code, http_status, grpc_status = 1007, 422, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class MissingExtraError(InhouseError):
    """An optional feature whose packages are not installed; the message names the extra."""

    code, http_status, grpc_status = 1008, 501, "UNIMPLEMENTED"


# 2xxx: requests
class InvalidRequestError(InhouseError):
    code, http_status, grpc_status = 2001, 400, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class InputNameError(InhouseError):
    """Missing, unknown or duplicated input / requested output."""

    code, http_status, grpc_status = 2002, 400, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class RouteNotFoundError(InhouseError):
    """A method and path the server has no route for (not an unknown model: agents tell their
    users to fix the model id on 1002)."""

    code, http_status, grpc_status = 2004, 404, "UNIMPLEMENTED"
    openai_type = "not_found_error"


class PayloadTooLargeError(InhouseError):
    code, http_status, grpc_status = 2013, 413, "RESOURCE_EXHAUSTED"
    openai_type = "invalid_request_error"


class RequestTimeoutError(InhouseError):
    """The client sent its request head or body too slowly (header_timeout_s / body_timeout_s)."""

    code, http_status, grpc_status = 2014, 408, "DEADLINE_EXCEEDED"
    openai_type = "invalid_request_error"


class HeadersTooLargeError(InhouseError):
    """The request line and headers exceed max_header_bytes."""

    code, http_status, grpc_status = 2015, 431, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class ShapeError(InhouseError):
    code, http_status, grpc_status = 2005, 400, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class DatatypeError(InhouseError):
    code, http_status, grpc_status = 2006, 400, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion longer than the model's context window (LLMs); a kind of
    invalid request, so callers catching 2001 errors catch it too."""

    code, http_status, grpc_status = 2030, 400, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class ResponseNotFoundError(InhouseError):
    """A stored response (Responses API) that does not exist for the caller's key."""

    code, http_status, grpc_status = 2040, 404, "NOT_FOUND"
    openai_type = "invalid_request_error"


class InferenceError(InhouseError):
    """The backend failed while running a valid request."""

    code, http_status, grpc_status = 2010, 500, "INTERNAL"


# 3xxx: scheduling
class QueueFullError(InhouseError):
    code, http_status, grpc_status = 3001, 429, "RESOURCE_EXHAUSTED"
    openai_type = "rate_limit_error"


class DeadlineExceededError(InhouseError):
    code, http_status, grpc_status = 3002, 504, "DEADLINE_EXCEEDED"
    openai_type = "timeout_error"


class CancelledError(InhouseError):
    code, http_status, grpc_status = 3003, 499, "CANCELLED"


class ConcurrencyLimitError(InhouseError):
    """More calls at once than the transport's configured limit (grpc.max_concurrent_rpcs)."""

    code, http_status, grpc_status = 3004, 429, "RESOURCE_EXHAUSTED"
    openai_type = "rate_limit_error"


class ServerNotReadyError(InhouseError):
    """Start-up loading is still running; clients that poll the model list should retry."""

    code, http_status, grpc_status = 3005, 503, "UNAVAILABLE"
    openai_type = "server_error"


class UpstreamUnavailableError(InhouseError):
    """A model served by another endpoint (``backend: upstream``) cannot be reached: its circuit
    is open, its health check fails, or it refused connections through every retry."""

    code, http_status, grpc_status = 3006, 503, "UNAVAILABLE"
    openai_type = "server_error"


# 4xxx: access
class UnauthenticatedError(InhouseError):
    code, http_status, grpc_status = 4001, 401, "UNAUTHENTICATED"
    openai_type = "authentication_error"


class ForbiddenError(InhouseError):
    code, http_status, grpc_status = 4003, 403, "PERMISSION_DENIED"
    openai_type = "permission_error"


class RateLimitedError(InhouseError):
    code, http_status, grpc_status = 4029, 429, "RESOURCE_EXHAUSTED"
    openai_type = "rate_limit_error"


class AuditUnavailableError(InhouseError):
    """The audit log cannot be written (a full disk, an I/O error): with the audit log on, a
    request is refused rather than answered unrecorded."""

    code, http_status, grpc_status = 4050, 503, "UNAVAILABLE"
    openai_type = "server_error"


# 5xxx: policy
class PolicyBlockedError(InhouseError):
    code, http_status, grpc_status = 5001, 400, "INVALID_ARGUMENT"
    openai_type = "invalid_request_error"


class InternalError(InhouseError):
    """An unexpected failure. The message never carries internals; the request id does."""

    code, http_status, grpc_status = 9000, 500, "INTERNAL"


def error_table() -> list[tuple[int, str, int, str]]:
    """(code, class name, HTTP status, gRPC status) for every error class, for docs and tests."""
    rows: list[tuple[int, str, int, str]] = []
    stack: list[type[InhouseError]] = [InhouseError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls is not InhouseError:
            rows.append((cls.code, cls.__name__, cls.http_status, cls.grpc_status))
    return sorted(rows)
