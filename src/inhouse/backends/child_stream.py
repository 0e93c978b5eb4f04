"""One streamed POST to a server child (llama-server, vLLM) and its server-sent events, on an
asyncio protocol with httptools parsing the response. httpx costs ~0.3 ms of CPU per event
through its anyio / httpcore / h11 layers; on a 2-core box that time is taken from the engine's
own threads, which slows every token. Here an event costs one callback and a split.

One connection per stream (``Connection: close``): connecting to a loopback or Unix socket costs
less than pooling would save, and closing the stream early closes the socket, which makes the
child cancel the request and free its slot. ``child_post`` makes a plain (not streamed) call the
same way, on the event loop: no thread hop and none of httpx's ~0.3 ms per call."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import orjson

_MAX_PENDING = 256  # events read ahead of the consumer before the socket stops being read
_MAX_LINE = 8 << 20  # an event line longer than this is not an engine's token event
_MAX_BODY = 256 << 20  # a plain answer (a rendered prompt) larger than this is not one


class StreamBroken(ConnectionError):
    """The connection ended before the response did, or the response could not be parsed."""


class _Response(asyncio.Protocol):
    def __init__(self, whole: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._partial = bytearray()
        self._paused = False
        self._whole = whole  # a plain answer: kept as one body, not split into lines
        self.whole_body = b""
        self.lines: collections.deque[bytes] = collections.deque()
        self.status = 0
        self.head_done = False
        self.complete = False
        self.error: str | None = None

    # -- transport --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as err:
            self._fail(f"unreadable response ({err})")
        if not self._paused and len(self.lines) > _MAX_PENDING and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.error is None:
            self.error = f"connection closed ({type(exc).__name__})" if exc else "connection closed"
        self._wake()

    # -- parser callbacks -------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        part = self._partial
        if self._whole:
            part += body
            if len(part) > _MAX_BODY:
                self._fail("an answer larger than the limit")
            return
        if b"\n" not in body:
            part += body
            if len(part) > _MAX_LINE:
                self._fail("an event line without an end")
            return
        if part:  # the end of a line that came in pieces
            part += body
            body = bytes(part)
            part.clear()
        done = body.split(b"\n")
        rest = done.pop()
        if rest:
            part += rest
        self.lines.extend(done)
        self._wake()

    def on_message_complete(self) -> None:
        if self._whole:
            self.whole_body = bytes(self._partial)
        elif self._partial:
            self.lines.append(bytes(self._partial))
            self._partial = bytearray()
        self.complete = True
        self._wake()

    # -- consumer side ----------------------------------------------------------------------
    def _fail(self, why: str) -> None:
        self.error = why
        if self._transport is not None:
            self._transport.close()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        """Until something new happened: head, lines, end or error."""
        if self._paused and self._transport is not None and len(self.lines) < _MAX_PENDING // 2:
            self._paused = False
            self._transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ChildStream:
    """``async with ChildStream(...) as s``: ``s.status`` once the head arrived; ``s.events()``
    yields each ``data:`` payload decoded as JSON (``[DONE]`` ends it); ``s.body()`` reads a
    non-streamed (error) body; with ``whole=True`` (a plain call) ``s.whole()`` reads the answer as
    it came. Leaving the block closes the connection."""

    def __init__(self, address: str | tuple[str, int], path: str, body: dict[str, Any],
                 headers: dict[str, str], connect_timeout_s: float = 10.0, *, whole: bool = False) -> None:
        self._address = address
        self._connect_timeout_s = connect_timeout_s
        payload = orjson.dumps(body)
        accept = "application/json" if whole else "text/event-stream"
        head = [f"POST {path} HTTP/1.1", "Host: child", "Content-Type: application/json",
                f"Accept: {accept}", "Connection: close", f"Content-Length: {len(payload)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self._request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        self._response = _Response(whole)
        self.status = 0

    async def __aenter__(self) -> ChildStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if isinstance(self._address, str):
                    transport, _ = await loop.create_unix_connection(lambda: self._response, self._address)
                else:
                    transport, _ = await loop.create_connection(lambda: self._response, *self._address)
        except (OSError, TimeoutError) as err:
            raise StreamBroken(f"cannot connect ({type(err).__name__})") from None
        transport.write(self._request)
        r = self._response
        try:
            while not r.head_done:
                if r.error is not None:
                    raise StreamBroken(r.error)
                await r.wait()
        except BaseException:
            r.close()
            raise
        self.status = r.status
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._response.close()

    async def _lines(self) -> AsyncIterator[bytes]:
        r = self._response
        lines = r.lines
        while True:
            while lines:
                yield lines.popleft()
            if r.complete:
                return
            if r.error is not None:
                raise StreamBroken(r.error)
            await r.wait()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        r = self._response
        lines = r.lines
        while True:  # _lines inlined: this runs once per token
            while lines:
                line = lines.popleft()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].rstrip(b"\r")
                if data == b"[DONE]":
                    return
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise StreamBroken("an event that is not JSON") from None
                if isinstance(doc, dict):
                    yield doc
            if r.complete:
                return
            if r.error is not None:
                raise StreamBroken(r.error)
            await r.wait()

    async def whole(self) -> bytes:
        """The body of a plain answer (``whole=True``)."""
        r = self._response
        while not r.complete:
            if r.error is not None:
                raise StreamBroken(r.error)
            await r.wait()
        return r.whole_body

    async def body(self, limit: int = 1 << 20) -> str:
        out = bytearray()
        async for line in self._lines():
            out += line + b"\n"
            if len(out) > limit:
                break
        return out.decode("utf-8", "replace").rstrip("\n")


async def child_post(address: str | tuple[str, int], path: str, body: dict[str, Any],
                     headers: dict[str, str]) -> tuple[int, bytes]:
    """One plain POST to a child: (status, body). Raises ``StreamBroken`` when the child cannot be
    reached or its answer is cut short."""
    async with ChildStream(address, path, body, headers, whole=True) as s:
        return s.status, await s.whole()
