"""Which cache scope a request belongs to, read by the protocol adapters from its headers or
metadata: the tenant is a digest of the API key presented (the security layer has verified it;
without authentication each distinct key string is still its own tenant), and a client's
``Cache-Control: no-cache`` (or ``no-store``) keeps its request out of the response cache."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from inhouse.security.pipeline import credential


def cache_tenant(cache_control: str | None, presented: str | None) -> str | None:
    """The tenant to cache a request under (``presented``: the API key it carries, see
    ``security.pipeline.credential``), or None when the client asked not to be cached."""
    if cache_control:
        directives = {d.strip().split("=", 1)[0].lower() for d in cache_control.split(",")}
        if "no-cache" in directives or "no-store" in directives:
            return None
    return hashlib.sha256(presented.encode()).hexdigest() if presented else ""


def headers_tenant(headers: Mapping[str, str]) -> str | None:
    """``cache_tenant`` of a request's (lower-case) HTTP headers or gRPC metadata."""
    return cache_tenant(headers.get("cache-control"), credential(headers.get("authorization"),
                                                                 headers.get("x-api-key")))
