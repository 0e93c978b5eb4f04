"""Forwarding, at the HTTP/2-stream level, of every RPC the front does not answer itself to the
grpc.aio server behind it, on its private Unix socket: one HTTP/2 client connection
(:class:`InnerLink`) per public connection, opened at its first forwarded stream.

Headers, messages, trailers and resets are relayed as they come, in both directions, each side
within the other's flow-control window (:class:`~inhouse.transports.grpc.outbox.Outbox`): bytes
are acknowledged to the side they came from once they are handed to the other. The request
headers gain the client's address, its verified certificate identity (mutual TLS) and the
per-process secret that makes the inner server trust them (``FRONT_*`` below); the same names
sent by a client are dropped first."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from inhouse.transports.grpc.h2_connection import Connection
from inhouse.transports.grpc.hpack_codec import CachingDecoder, StatelessEncoder
from inhouse.transports.grpc.outbox import Headers, Outbox, gone

log = logging.getLogger(__name__)

FRONT_PREFIX = b"x-inhouse-front-"
FRONT_SECRET = "x-inhouse-front-secret"  # noqa: S105  # a metadata name
FRONT_PEER = "x-inhouse-front-peer"
FRONT_IDENTITY = "x-inhouse-front-identity"
WINDOW = 16 * 1024 * 1024


class Downstream:
    """What the link needs of the public connection a relayed stream belongs to (``front.py``)."""

    def relay_headers(self, sid: int, headers: Headers, end: bool) -> None: ...
    def relay_data(self, sid: int, data: bytes, ack: Callable[[int], None]) -> None: ...
    def relay_trailers(self, sid: int, trailers: Headers) -> None: ...
    def relay_end(self, sid: int) -> None: ...
    def relay_reset(self, sid: int, code: int) -> None: ...
    def relay_lost(self, sids: list[tuple[int, bool]]) -> None: ...


class InnerLink(asyncio.Protocol):
    """An HTTP/2 client connection to the inner server, for one public connection. Streams can
    be opened before the socket connects: h2 holds the bytes until then."""

    def __init__(self, down: Downstream) -> None:
        self._down = down
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False,
                                           normalize_inbound_headers=False, validate_outbound_headers=False,
                                           normalize_outbound_headers=False, split_outbound_cookies=False)
        conn = self.conn = Connection(config=config)
        conn.encoder = StatelessEncoder()
        conn.decoder = CachingDecoder()
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW, h2.settings.SettingCodes.ENABLE_PUSH: 0})
        conn.initiate_connection()
        conn.increment_flow_control_window(WINDOW - 65535)
        self.outbox = Outbox(conn)
        self._to_public: dict[int, int] = {}  # inner stream -> public stream
        self._answered: set[int] = set()  # inner streams whose response headers went out
        self._transport: asyncio.Transport | None = None
        self.closed = False

    # ---- the public side's requests ----------------------------------------------------------
    def open(self, sid: int, headers: Headers, end: bool) -> int:
        """Opens the inner stream for public stream ``sid``; returns its id."""
        inner = self.conn.get_next_available_stream_id()
        self.conn.send_headers(inner, headers, end_stream=end)
        self._to_public[inner] = sid
        self.flush()
        return inner

    def data(self, inner: int, data: bytes, ack: Callable[[int], None]) -> None:
        self.outbox.send(inner, data, sent=ack)
        self.flush()

    def end(self, inner: int) -> None:
        self.outbox.send(inner, b"", end=True)
        self.flush()

    def cancel(self, inner: int) -> None:
        self._to_public.pop(inner, None)
        self._answered.discard(inner)
        self.outbox.drop(inner)
        with gone():
            self.conn.reset_stream(inner, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def ack(self, inner: int, size: int) -> None:
        with gone():
            self.conn.acknowledge_received_data(size, inner)
        self.flush()

    @property
    def busy(self) -> bool:
        return bool(self._to_public)

    # ---- the socket ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self.closed:
            self._transport.close()
            return
        self.flush()

    def flush(self) -> None:
        if self._transport is None or self.closed:
            return  # not connected yet: h2 keeps the bytes
        out = self.conn.data_to_send()
        if out:
            self._transport.write(out)

    def close(self) -> None:
        self.closed = True
        self._to_public.clear()
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def lost(self) -> None:
        """The inner connection is gone (or never came): every stream still relayed ends UNAVAILABLE."""
        self.closed = True
        streams = [(sid, inner in self._answered) for inner, sid in self._to_public.items()]
        self._to_public.clear()
        if streams:
            self._down.relay_lost(streams)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # after its GOAWAY (grpc follows it with a PING): h2 takes no more frames
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                # (frames after its GOAWAY, such as grpc's PING, are only the end of a stop)
                log.warning("the inner gRPC server broke HTTP/2", extra={"error": str(exc)})
            self.lost()
            if self._transport is not None:
                self._transport.close()
            return
        down, to_public = self._down, self._to_public
        for event in events:
            inner = getattr(event, "stream_id", 0)
            sid = to_public.get(inner)
            if isinstance(event, h2.events.DataReceived):
                padding = event.flow_controlled_length - len(event.data)
                if sid is None:
                    self.ack(inner, event.flow_controlled_length)
                    continue
                if padding:
                    self.ack(inner, padding)
                down.relay_data(sid, event.data, _acker(self, inner))
            elif isinstance(event, h2.events.ResponseReceived):
                if sid is not None:
                    self._answered.add(inner)
                    down.relay_headers(sid, list(event.headers), event.stream_ended is not None)
                    if event.stream_ended is not None:
                        self._done(inner)
            elif isinstance(event, h2.events.TrailersReceived):
                if sid is not None:
                    down.relay_trailers(sid, list(event.headers))
                    self._done(inner)
            elif isinstance(event, h2.events.StreamEnded):
                if sid is not None:
                    down.relay_end(sid)
                    self._done(inner)
            elif isinstance(event, h2.events.StreamReset):
                if sid is not None:
                    down.relay_reset(sid, int(event.error_code))
                    self._done(inner)
                self.outbox.drop(inner)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.outbox.drain(inner or None)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.lost()
                if self._transport is not None:
                    self._transport.close()
                return
        self.flush()

    def _done(self, inner: int) -> None:
        self._to_public.pop(inner, None)
        self._answered.discard(inner)


def _acker(link: InnerLink, inner: int) -> Callable[[int], None]:
    return lambda size: link.ack(inner, size)


def forwarded_headers(headers: list[tuple[bytes, bytes]], secret: str, peer: str | None,
                      identity: str | None) -> Headers:
    """The request headers for the inner server: the client's own, less any ``x-inhouse-front-*``,
    plus ours."""
    out = [(k, v) for k, v in headers if not k.lower().startswith(FRONT_PREFIX)]
    out.append((FRONT_SECRET.encode(), secret.encode()))
    if peer is not None:
        out.append((FRONT_PEER.encode(), peer.encode("latin-1", "replace")))
    if identity is not None:
        out.append((FRONT_IDENTITY.encode(), identity.encode("ascii", "replace")))
    return out


def certificate_identity(cert: Any) -> str | None:
    """The verified client certificate's subject common name (else its first subject
    alternative name), from ``SSLSocket.getpeercert()``'s dict."""
    if not isinstance(cert, dict):
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for _, value in cert.get("subjectAltName", ()):
        return str(value)
    return None


async def connect(link: InnerLink, path: str) -> None:
    """Connects ``link`` to the inner server's socket; a failure ends its streams UNAVAILABLE."""
    loop = asyncio.get_running_loop()
    try:
        await loop.create_unix_connection(lambda: link, path)
    except OSError as exc:
        log.error("cannot reach the inner gRPC server", extra={"socket": path, "error": str(exc)})
        link.lost()


def closing(link: InnerLink | None) -> None:
    if link is not None:
        with contextlib.suppress(Exception):
            link.close()
