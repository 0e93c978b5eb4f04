"""JSON documents a client sent (a request body, a load request's config), parsed with one rule
and one error wording for every caller."""

from __future__ import annotations

from typing import Any

import orjson

from inhouse.errors import InvalidRequestError


def json_object(raw: bytes | str, what: str = "Request body") -> dict[str, Any]:
    """``raw`` parsed as a JSON object, or a 2001 error naming ``what``."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequestError(f"{what} is not valid JSON: {err}.") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{what} must be a JSON object.")
    return doc
