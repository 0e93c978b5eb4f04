"""Images in chat messages (OpenAI ``image_url`` parts, Anthropic image blocks mapped to them):
data URLs, or remote URLs under a prefix the operator allow-listed (``image_url_allow``) —
inhouse never fetches an arbitrary address a client names — and the bytes must be an image
format the engines read. The size limit is the model's (``max_image_bytes``), checked by the
service once it knows the model."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from inhouse.errors import InferenceError, InvalidRequestError, PayloadTooLargeError

# Where an image stood in a message's text; an engine that reads images swaps in its own marker.
IMAGE_MARKER = "<__inhouse_image__>"



@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image part as the client sent it, decoded only once the model is known to read images
    (a text-only model answers that it reads text only, whatever the data)."""

    where: str  # e.g. messages[0].content[1]
    kind: str  # the part's type
    part: dict[str, Any]

    @property
    def url(self) -> str | None:
        url: Any = self.part.get("image_url", self.part.get("url"))
        if isinstance(url, dict):
            url = url.get("url")
        return url if isinstance(url, str) else None

    def decode(self) -> bytes:
        return decode_image_part(self.part, self.where)


class ImageFetcher:
    """Fetches remote images whose URL lies under an allow-listed prefix: same scheme and host
    (and port), and a path that starts with the prefix's. No redirects (they could lead off the
    list); the body is cut off past the size limit."""

    def __init__(self, allow: Sequence[str], timeout_s: float = 10.0) -> None:
        self._allow = [urlsplit(a) for a in allow]
        self._timeout_s = timeout_s

    def allowed(self, url: str) -> bool:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or u.username or u.password:
            return False
        return any(u.scheme == a.scheme and u.netloc == a.netloc and u.path.startswith(a.path or "/")
                   for a in self._allow)

    async def fetch(self, url: str, limit: int, where: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, follow_redirects=False) as client, \
                    client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise InvalidRequestError(f"{where}: fetching the allow-listed image answered HTTP "
                                              f"{r.status_code}.", details={"param": f"{where}.image_url"})
                async for chunk in r.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLargeError(f"{where} is an image larger than the model accepts ({limit} "
                                                   "bytes, max_image_bytes); send a smaller image.",
                                                   details={"param": where})
                    chunks.append(chunk)
        except httpx.HTTPError as err:
            raise InferenceError(f"{where}: the allow-listed image could not be fetched ({type(err).__name__}).") \
                from None
        data = b"".join(chunks)
        if image_format(data) is None:
            raise InvalidRequestError(f"{where} is not an image: send PNG, JPEG, GIF, WebP or BMP data.",
                                      details={"param": f"{where}.image_url"})
        return data


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def image_format(data: bytes) -> str | None:
    """The format named by the file's own first bytes (not by the client's media type)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def decode_image_part(part: dict[str, Any], where: str) -> bytes:
    """The bytes of an ``image_url`` / ``input_image`` part. Raises a 400 for a remote URL, a
    malformed data URL or data that is not an image."""
    url: Any = part.get("image_url", part.get("url"))
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(f"{where}.image_url.url must be a data URL (data:image/png;base64,...).",
                                  details={"param": f"{where}.image_url"})
    if not url.startswith("data:"):
        raise InvalidRequestError(f"{where} names a remote image that is not on the server's image_url_allow "
                                  "list; inhouse does not fetch other addresses for a client. Send the image itself "
                                  "as a data URL (data:image/png;base64,...).", details={"param": f"{where}.image_url"})
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidRequestError(f"{where} must be a base64 data URL (data:image/png;base64,...).",
                                  details={"param": f"{where}.image_url"})
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{where} holds invalid base64 data.", details={"param": f"{where}.image_url"}) \
            from None
    if image_format(data) is None:
        raise InvalidRequestError(f"{where} is not an image: send PNG, JPEG, GIF, WebP or BMP data.",
                                  details={"param": f"{where}.image_url"})
    return data
