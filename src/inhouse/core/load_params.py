"""The parameters of a model-repository load request (``POST /v2/repository/models/{m}/load``,
gRPC ``RepositoryModelLoad``): one rule for both transports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inhouse.core.json_doc import json_object
from inhouse.errors import InvalidRequestError


def load_overrides(params: Mapping[str, Any], what: str) -> dict[str, Any] | None:
    """The spec override a load request carries, or None. ``config`` is the only parameter: a JSON
    object merged over model.yaml, as a string or bytes (REST may also send the object itself).
    ``what`` names the parameter the way the client wrote it, for the error messages."""
    unknown = [k for k in params if k != "config"]
    if unknown:
        raise InvalidRequestError(
            f"Unsupported load parameter(s) {unknown}; only 'config' (a JSON object merged over "
            "model.yaml) is accepted."
        )
    if "config" not in params:
        return None
    raw = params["config"]
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str | bytes):
        raise InvalidRequestError(f"{what} must be a JSON object, or a string holding one.")
    return json_object(raw, what)
