"""One streamed POST to a server child (llama-server, vLLM) and its server-sent events, on an
asyncio protocol with httptools parsing the response. httpx costs ~0.3 ms of CPU per event
through its anyio / httpcore / h11 layers; on a 2-core box that time is taken from the engine's
own threads, which slows every token. Here an event costs one callback and a split.

One connection per stream (``Connection: close``): closing the stream early closes the socket,
which makes the child cancel the request and free its slot (llama-server closes a connection
after a stream anyway). ``child_post`` makes a plain (not streamed) call on the event loop, on a
connection kept alive from the last one when there is one (a chat's ``/apply-template``): no
thread hop, none of httpx's ~0.3 ms per call, and no connect and accept on either side."""

from __future__ import annotations

import asyncio
import collections
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import orjson

_MAX_PENDING = 256  # events read ahead of the consumer before the socket stops being read
_MAX_LINE = 8 << 20  # an event line longer than this is not an engine's token event
_MAX_BODY = 256 << 20  # a plain answer (a rendered prompt) larger than this is not one
_IDLE_S = 2.0  # a kept-alive connection idle longer is closed: below cpp-httplib's and uvicorn's 5 s
_MAX_IDLE = 4  # kept-alive connections per child; each holds one of llama-server's HTTP threads


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
        self.answered = False  # any byte came back
        self.keep_alive = False  # the child keeps the connection open after this answer
        self.error: str | None = None

    # -- transport --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.answered = True
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
        self.keep_alive = self._parser.should_keep_alive()
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

    def release(self, address: str | tuple[str, int]) -> None:
        """After a plain answer: the connection goes back to the child's idle ones, or is closed."""
        t = self._transport
        if t is None or not (self.complete and self.keep_alive and self.error is None) or t.is_closing():
            self.close()
            return
        idle = _idle(address)
        if len(idle) >= _MAX_IDLE:
            t.close()
            return
        self._transport = None
        idle.append(_Idle(idle, t))


class _Idle(asyncio.Protocol):
    """A kept-alive connection between plain calls; the child closing it (or sending anything
    unasked) drops it."""

    def __init__(self, idle: list[_Idle], transport: asyncio.Transport) -> None:
        self.idle, self.transport, self.since = idle, transport, time.monotonic()
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)


# per event loop (a transport belongs to one), per child address
_IDLE: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str | tuple[str, int], list[_Idle]]] = (
    weakref.WeakKeyDictionary())


def _idle(address: str | tuple[str, int]) -> list[_Idle]:
    return _IDLE.setdefault(asyncio.get_running_loop(), {}).setdefault(address, [])


def _take_idle(address: str | tuple[str, int]) -> asyncio.Transport | None:
    idle = _idle(address)
    now = time.monotonic()
    while idle:
        conn = idle.pop()  # the most recent: the least likely to have timed out on the child's side
        if now - conn.since < _IDLE_S and not conn.transport.is_closing():
            return conn.transport
        conn.transport.close()
    return None


class ChildStream:
    """``async with ChildStream(...) as s``: ``s.status`` once the head arrived; ``s.events()``
    yields each ``data:`` payload decoded as JSON (``[DONE]`` ends it); ``s.body()`` reads a
    non-streamed (error) body; with ``whole=True`` (a plain call) ``s.whole()`` reads the answer as
    it came. Leaving the block closes the connection."""

    def __init__(self, address: str | tuple[str, int], path: str, body: dict[str, Any],
                 headers: dict[str, str], connect_timeout_s: float = 10.0, *, whole: bool = False,
                 reuse: asyncio.Transport | None = None) -> None:
        self._address = address
        self._connect_timeout_s = connect_timeout_s
        self._reuse = reuse  # a kept-alive connection to send on (plain calls only)
        payload = orjson.dumps(body)
        accept = "application/json" if whole else "text/event-stream"
        head = [f"POST {path} HTTP/1.1", "Host: child", "Content-Type: application/json",
                f"Accept: {accept}", f"Connection: {'keep-alive' if whole else 'close'}",
                f"Content-Length: {len(payload)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self._request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
        self._response = _Response(whole)
        self.status = 0

    async def __aenter__(self) -> ChildStream:
        transport = self._reuse
        if transport is not None:
            transport.set_protocol(self._response)
            self._response.connection_made(transport)
        else:
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

    @property
    def answered(self) -> bool:
        return self._response.answered

    async def __aexit__(self, *exc: object) -> None:
        if self._response._whole and exc[0] is None:
            self._response.release(self._address)
        else:
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
    while True:
        reuse = _take_idle(address)
        s = ChildStream(address, path, body, headers, whole=True, reuse=reuse)
        try:
            async with s:
                return s.status, await s.whole()
        except StreamBroken:
            if reuse is None or s.answered:
                raise
            # a kept-alive connection the child closed as this call went out: again, on another one
