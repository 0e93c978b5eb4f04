"""Limits on what one HTTP client may hold: how long its request head and body may take to
arrive, and how many bytes its request line and headers may have.

uvicorn's httptools protocol has neither: a connection that sends its headers one byte a
second (slowloris), or nothing at all, is kept forever, and the request line and headers are
collected however large they grow. :class:`ClientLimits` is a mixin over that protocol (and
over the fast path's subclass of it) adding three settings: ``header_timeout_s`` (from the
connection's start, or a request's first byte, until its headers are complete; 408, code
2014), ``body_timeout_s`` (from the headers until the whole body has arrived; 408) and
``max_header_bytes`` (request target plus header names and values; 431, code 2015). Each
refusal is a v2 error body and closes the connection; idle keep-alive connections stay
uvicorn's (``timeout_keep_alive``), except that on stop an idle TLS connection is dropped at once."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inhouse.errors import HeadersTooLargeError, InhouseError, RequestTimeoutError
from inhouse.protocols.errors import v2_error_parts


class ClientLimits(HttpToolsProtocol):
    """Put first in the bases of the protocol class uvicorn instantiates (see :func:`limited`)."""

    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._begun = False  # a byte of the current request has arrived
        self._refusal: InhouseError | None = None
        self._read_clock: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        if self._read_clock is not None:
            self._read_clock.cancel()
        self._read_clock = self.loop.call_later(seconds, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_clock is not None:
            self._read_clock.cancel()
            self._read_clock = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)  # a client that connects and says nothing is not kept

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle and self.transport.get_extra_info("ssl_object") is not None:
            # closing TLS waits for the client's close_notify (asyncio's 30 s ssl_shutdown_timeout),
            # which an idle keep-alive client never sends: the stop would wait out drain_timeout_s
            self.transport.abort()

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._begun = True
        self._arm(self.header_timeout_s)
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_header_bytes:
            self._refusal = HeadersTooLargeError(
                f"The request line and headers are larger than the server's limit of {self.max_header_bytes} "
                "bytes (max_header_bytes); send fewer or shorter headers.")
            raise self._refusal  # the parser stops; uvicorn answers through send_400_response

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._begun = False
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the connection is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
            return
        self._refuse(self._refusal)

    def _read_timed_out(self) -> None:
        self._read_clock = None
        if self.transport.is_closing():
            return
        if not self._begun:  # connected, never sent a byte: nothing to answer
            self.transport.close()
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and getattr(cycle, "response_started", False):
            self.transport.close()  # the application is already answering: only stop waiting
            return
        self._refuse(RequestTimeoutError(
            f"The request did not arrive in time (header_timeout_s {self.header_timeout_s:g} s for the headers, "
            f"body_timeout_s {self.body_timeout_s:g} s for the body); send it faster or raise the limits."))

    def _refuse(self, err: InhouseError) -> None:
        status, headers, body = v2_error_parts(err)
        out = [STATUS_LINE[status]]
        for name, value in headers:
            out += (name, b": ", value, b"\r\n")
        out += (b"connection: close\r\n\r\n", body)
        self.transport.write(b"".join(out))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def limited(protocol: type[HttpToolsProtocol], *, header_timeout_s: float, body_timeout_s: float,
            max_header_bytes: int) -> type[HttpToolsProtocol]:
    """``protocol`` (uvicorn's, or the fast path's) with :class:`ClientLimits` in front of it."""
    return type(f"Limited{protocol.__name__}", (ClientLimits, protocol),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                 "max_header_bytes": max_header_bytes})
