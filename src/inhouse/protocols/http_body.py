"""Reading request bodies safely: a size limit enforced while streaming, and the request
compression tritonclient may use (gzip / deflate), decompressed under the same limit."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from inhouse.core.memory import release_freed_memory
from inhouse.errors import CancelledError, InvalidRequestError, PayloadTooLargeError

T = TypeVar("T")
# how an infer entry gets its request body, and how it awaits the inference so that the work is
# cancelled when the client goes away (both differ between ASGI and the HTTP fast path)
BodyReader = Callable[[], Awaitable[bytes]]
InferGuard = Callable[[Coroutine[Any, Any, T]], Awaitable[T]]


def header_text(value: bytes | None) -> str | None:
    """A raw header value (ASGI / httptools bytes) as text, or None when absent."""
    return value.decode("latin-1") if value is not None else None


def client_gone(task: asyncio.Task[Any]) -> CancelledError:
    """The error for inference cancelled because its client disconnected; ``task`` (the request's
    own, cancelled for that reason) is un-cancelled so that the answer can still be recorded."""
    task.uncancel()
    return CancelledError("The client closed the connection; the request was cancelled.")


def too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"Request body is larger than the server's limit of {limit} bytes "
        "(max_request_bytes); send a smaller request or raise the limit."
    )


async def read_body(request: Request, limit: int) -> bytes:
    h = request.headers
    return await receive_body(request.receive, limit, h.get("content-length"), h.get("content-encoding"))


async def receive_body(receive: Receive, limit: int, declared: str | None = None,
                       encoding: str | None = None) -> bytes:
    """The request body from raw ASGI messages (cheaper than ``request.stream()`` on the hot
    path), under ``limit`` bytes, decompressed when ``encoding`` (Content-Encoding) says so."""
    check_declared_length(declared, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise InvalidRequestError("The client closed the connection before sending the whole body.")
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return decode_body(chunks[0] if len(chunks) == 1 else b"".join(chunks), limit, encoding)


def check_declared_length(declared: str | None, limit: int) -> None:
    """A Content-Length over ``limit`` is refused before the body is read."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            raise InvalidRequestError("Content-Length header is not a number.") from None


# inflate this much at a time: a body that inflates past the limit is refused after at most
# ``limit`` bytes plus one piece, not after one buffer of ``limit`` grown (and copied) in steps
INFLATE_PIECE = 256 * 1024


def decode_body(body: bytes, limit: int, encoding: str | None) -> bytes:
    """``body`` decompressed as its Content-Encoding says, under the same ``limit``."""
    encoding = (encoding or "identity").lower()
    if encoding in ("identity", ""):
        return body
    if encoding in ("gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        return _inflate(body, limit, wbits, encoding)
    raise InvalidRequestError(f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none.")


def _inflate(body: bytes, limit: int, wbits: int, encoding: str) -> bytes:
    d = zlib.decompressobj(wbits)
    pieces: list[bytes] = []
    size = 0
    data = body
    try:
        while not d.eof:
            piece = d.decompress(data, INFLATE_PIECE)
            data = d.unconsumed_tail
            if not piece and not data:
                break  # the input is used up
            size += len(piece)
            if size > limit:
                break
            pieces.append(piece)
    except zlib.error:
        raise InvalidRequestError(f"Request body is not valid {encoding} data.") from None
    if size > limit:
        # dropped before the error is raised (its traceback keeps this frame alive a while), and
        # the freed pages handed back: the pieces were small enough to come from malloc's heap
        del pieces, piece, data, d
        release_freed_memory()
        raise too_large(limit)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _DisconnectWatch:
    """Cancels ``task`` when the client goes away; started only for slow requests."""

    __slots__ = ("gone", "receive", "task", "timer", "watcher")

    def __init__(self, receive: Receive, task: asyncio.Task[Any], grace_s: float) -> None:
        self.receive = receive
        self.task = task
        self.gone = False
        self.watcher: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(grace_s, self._start)

    def _start(self) -> None:
        self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.task.cancel()
                return

    def stop(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


async def cancel_on_disconnect(receive: Receive, work: Coroutine[Any, Any, T], *, grace_s: float = 0.05) -> T:
    """Await ``work`` in the current task, cancelling it if the client disconnects first, so
    queued inference never runs for nobody. Call only after the body was read: the server's
    ``receive`` then blocks until the connection closes. Watching starts after ``grace_s``:
    requests answered sooner cost no extra task."""
    task = asyncio.current_task()
    if task is None:
        return await work
    watch = _DisconnectWatch(receive, task, grace_s)
    try:
        return await work
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        raise client_gone(task) from None
    finally:
        watch.stop()
