"""The HTTP/2 front of the gRPC port: an asyncio protocol over the ``h2`` library that answers
``inference.GRPCInferenceService/ModelInfer`` itself (:mod:`~inhouse.transports.grpc.infer_call`)
and forwards every other stream to the grpc.aio server behind it (:mod:`~inhouse.transports.grpc.forward`).

Why: grpc.aio spends 200-250 µs of CPU per call on its own (C-core completion queues, a Python
callback per event, a task per RPC), several times what the REST infer path costs in all; the
front spends about half that on HTTP/2 for the hot RPC, and forwarding keeps every other RPC,
streams included, exactly as grpc.aio serves it (see ``bench/README.md``).

What the front does itself: TLS and mutual TLS (the same material as REST, ALPN ``h2``),
``grpc-timeout``, ``grpc-encoding`` gzip/deflate on requests, the message size limit
(RESOURCE_EXHAUSTED), keep-alive pings, and a graceful stop: GOAWAY, the calls in flight finish,
then the connection closes."""

from __future__ import annotations

import asyncio
import gzip
import logging
import struct
import zlib
from typing import Any, cast

import grpc
import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from inhouse.transports.grpc import forward
from inhouse.transports.grpc.h2_connection import Connection
from inhouse.transports.grpc.hpack_codec import CachingDecoder, StatelessEncoder
from inhouse.transports.grpc.infer_call import METHOD, Answer, InferCall, status_trailers
from inhouse.transports.grpc.outbox import Headers, Outbox, gone

log = logging.getLogger(__name__)

_METHOD = METHOD.encode()
_WINDOW = forward.WINDOW  # per stream and per connection: a call's message seldom waits for a window update
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-accept-encoding", b"identity,deflate,gzip")]
_RESPONSE_BLOCK = StatelessEncoder().encode(_RESPONSE_HEADERS)  # static indexes and plain literals only
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None, validate_inbound_headers=False, normalize_inbound_headers=False,
    validate_outbound_headers=False, normalize_outbound_headers=False, split_outbound_cookies=False)
_PING = b"inhouse!"


def parse_timeout(value: bytes | None) -> float | None:
    """``grpc-timeout`` (``100m``, ``5S``...) in seconds; None when absent or malformed."""
    if not value or len(value) > 9 or value[-1:] not in _UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _UNITS[value[-1:]]


class FrontConfig:
    """What every connection of one front shares."""

    def __init__(self, infer: InferCall | None, max_message: int, inner_path: str, secret: str,
                 keepalive_s: float, keepalive_timeout_s: float) -> None:
        self.infer = infer  # None: ModelInfer is forwarded like the rest
        self.max_message = max_message
        self.inner_path = inner_path
        self.secret = secret
        self.keepalive_s = keepalive_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connections: set[FrontProtocol] = set()
        self.stopping = False


class _Call:
    """A ModelInfer stream taken by the front: its headers, then its message."""

    __slots__ = ("data", "headers", "size", "task")

    def __init__(self, headers: dict[bytes, bytes]) -> None:
        self.headers = headers
        self.data: list[bytes] = []
        self.size = 0
        self.task: asyncio.Task[None] | None = None


class FrontProtocol(asyncio.Protocol, forward.Downstream):
    """One public HTTP/2 connection."""

    def __init__(self, config: FrontConfig) -> None:
        self._config = config
        conn = self._h2 = Connection(config=_CONFIG)
        conn.encoder = StatelessEncoder()
        conn.decoder = CachingDecoder()
        self._outbox = Outbox(conn)
        self._calls: dict[int, _Call] = {}
        self._relayed: dict[int, int] = {}  # public stream -> inner stream
        self._link: forward.InnerLink | None = None
        self._transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._identity: str | None = None
        self._flush_soon = False
        self._draining: int | None = None  # the last stream id of our GOAWAY
        self._heard = True  # anything received since the last keep-alive check
        self._pinged = False
        self._keepalive: asyncio.TimerHandle | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]).split("%")[0] if isinstance(peer, tuple) and peer else None
        self._identity = forward.certificate_identity(transport.get_extra_info("peercert"))
        conn = self._h2
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1024,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
        })
        conn.initiate_connection()
        conn.increment_flow_control_window(_WINDOW - 65535)
        transport.write(conn.data_to_send())
        self._config.connections.add(self)
        self._arm_keepalive(self._config.keepalive_s)
        if self._config.stopping:  # accepted just before the listener closed
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self._config.connections.discard(self)
        for call in self._calls.values():
            if call.task is not None:
                call.task.cancel()
        self._calls.clear()
        self._relayed.clear()
        forward.closing(self._link)
        self._link = None
        self._transport = None
        if self._keepalive is not None:
            self._keepalive.cancel()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued the GOAWAY that says why; send it and hang up
            log.info("gRPC client broke HTTP/2", extra={"error": str(exc)[:200]})
            self._flush()
            self._close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._reset(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._outbox.drain(getattr(event, "stream_id", 0) or None)
            elif isinstance(event, h2.events.TrailersReceived):
                self._ended(event.stream_id)  # a client's trailers end its stream (no metadata for us)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush()
                self._close()
                return
        self._flush()

    def _flush(self) -> None:
        self._flush_soon = False
        out = self._h2.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)
        if self._draining is not None and not self._calls and not self._relayed and not self._outbox.busy:
            self._close()  # stopping, and the last answer is out

    def _later(self) -> None:
        """Flush at the end of this loop turn: the answers finishing together go out in one write."""
        if not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ---- keep-alive and stop ------------------------------------------------------------------
    def _arm_keepalive(self, delay: float) -> None:
        self._keepalive = asyncio.get_running_loop().call_later(delay, self._check_alive)

    def _check_alive(self) -> None:
        """After ``keepalive_time_s`` without a frame from the client, a PING; a client that sends
        nothing within ``keepalive_timeout_s`` after it is gone, and the connection is closed (as
        grpc.aio does)."""
        if self._transport is None:
            return
        cfg = self._config
        if self._heard:
            self._heard = self._pinged = False
            self._arm_keepalive(cfg.keepalive_s)
            return
        if self._pinged:
            self._close()
            return
        with gone():
            self._h2.ping(_PING)
        self._flush()
        self._pinged = True
        self._arm_keepalive(cfg.keepalive_timeout_s)

    def drain(self) -> None:
        """GOAWAY now: streams the client opened so far are served, later ones refused; the
        connection closes once the last is answered. (h2 itself would refuse to send anything
        after its own GOAWAY, so the frame is written here, between its outputs.)"""
        if self._draining is not None or self._transport is None:
            return
        self._flush()
        last = self._h2.highest_inbound_stream_id
        self._draining = last
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = last
        frame.error_code = 0
        self._transport.write(frame.serialize())
        self._flush()

    def abort(self) -> None:
        self._close()

    # ---- streams ------------------------------------------------------------------------------
    def _request(self, event: Any) -> None:
        sid: int = event.stream_id
        if self._draining is not None and sid > self._draining:
            with gone():
                self._h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        raw: list[tuple[bytes, bytes]] = event.headers
        headers = dict(raw)
        if (self._config.infer is not None and headers.get(b":path") == _METHOD and headers.get(b":method") == b"POST"
                and headers.get(b"content-type", b"").startswith(b"application/grpc")):
            self._calls[sid] = _Call(headers)
            if event.stream_ended is not None:
                self._ended(sid)
            return
        self._forward(sid, raw, event.stream_ended is not None)

    def _data(self, event: Any) -> None:
        sid: int = event.stream_id
        inner = self._relayed.get(sid)
        link = self._link
        if inner is not None and link is not None:
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self._ack(sid, padding)
            link.data(inner, event.data, lambda size: self._ack(sid, size))
            return
        self._ack(sid, event.flow_controlled_length)
        call = self._calls.get(sid)
        if call is None or call.task is not None:
            return
        call.size += len(event.data)
        limit = self._config.max_message
        if call.size <= limit + 5:
            call.data.append(event.data)
            if call.size >= 5 and len(call.data[0]) >= 5:
                declared = struct.unpack_from(">I", call.data[0], 1)[0]
                if declared <= limit:
                    return
        # too large: answered now, without reading the rest (the client may still be sending it)
        self._calls.pop(sid, None)
        self._send(sid, _too_large(limit))
        with gone():
            self._h2.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)

    def _ack(self, sid: int, size: int) -> None:
        with gone():
            self._h2.acknowledge_received_data(size, sid)
        self._later()

    def _ended(self, sid: int) -> None:
        inner = self._relayed.get(sid)
        if inner is not None and self._link is not None:
            self._link.end(inner)
            return
        call = self._calls.get(sid)
        if call is None or call.task is not None:
            return
        call.task = asyncio.get_running_loop().create_task(self._answer(sid, call))

    def _reset(self, sid: int) -> None:
        self._outbox.drop(sid)
        inner = self._relayed.pop(sid, None)
        if inner is not None and self._link is not None:
            self._link.cancel(inner)
        call = self._calls.pop(sid, None)
        if call is not None and call.task is not None:
            call.task.cancel()

    # ---- ModelInfer ---------------------------------------------------------------------------
    async def _answer(self, sid: int, call: _Call) -> None:
        try:
            message = self._message(call)
            if isinstance(message, Answer):
                answer = message
            else:
                md = {k.decode("latin-1"): v.decode("latin-1") for k, v in call.headers.items()
                      if k[:1] != b":" and not k.endswith(b"-bin")}
                infer = self._config.infer
                assert infer is not None  # only ModelInfer calls are taken, and only with it
                answer = await infer.answer(md, self._peer, message, parse_timeout(call.headers.get(b"grpc-timeout")))
        finally:
            self._calls.pop(sid, None)
        self._send(sid, answer)

    def _message(self, call: _Call) -> bytes | Answer:
        """The one request message of a unary call, or the error answer about it."""
        data = call.data[0] if len(call.data) == 1 else b"".join(call.data)
        if len(data) < 5:
            return _error(grpc.StatusCode.INTERNAL, "The request has no complete gRPC message.")
        flag, length = struct.unpack_from(">BI", data)
        if length != len(data) - 5:
            return _error(grpc.StatusCode.INTERNAL, "A unary request must carry exactly one gRPC message.")
        body = data[5:]
        if flag == 1:
            encoding = call.headers.get(b"grpc-encoding", b"identity")
            try:
                if encoding == b"gzip":
                    body = gzip.decompress(body)
                elif encoding == b"deflate":
                    body = zlib.decompress(body)
                else:
                    return _error(grpc.StatusCode.UNIMPLEMENTED,
                                  f"Compression {encoding.decode('latin-1')!r} is not supported; use gzip or deflate.")
            except (OSError, zlib.error, EOFError):
                return _error(grpc.StatusCode.INTERNAL, "The compressed request message does not decompress.")
            if len(body) > self._config.max_message:
                return _too_large(self._config.max_message, len(body))
        elif flag != 0:
            return _error(grpc.StatusCode.INTERNAL, f"Bad gRPC message flag {flag}.")
        return body

    def _send(self, sid: int, answer: Answer) -> None:
        conn = self._h2
        with gone():
            if answer.message is None:
                conn.send_headers(sid, [*_RESPONSE_HEADERS, *answer.trailers], end_stream=True)
            else:
                message = struct.pack(">BI", 0, len(answer.message)) + answer.message
                if not self._outbox.unary(sid, _RESPONSE_BLOCK, message, answer.trailers):
                    conn.send_headers(sid, _RESPONSE_HEADERS)
                    self._outbox.send(sid, message, trailers=answer.trailers)
        self._later()

    # ---- forwarding ---------------------------------------------------------------------------
    def _forward(self, sid: int, raw: list[tuple[bytes, bytes]], end: bool) -> None:
        cfg = self._config
        link = self._link
        if link is None or link.closed:
            link = self._link = forward.InnerLink(self)
            asyncio.get_running_loop().create_task(forward.connect(link, cfg.inner_path))
        headers = forward.forwarded_headers(raw, cfg.secret, self._peer, self._identity)
        self._relayed[sid] = link.open(sid, headers, end)

    def relay_headers(self, sid: int, headers: Headers, end: bool) -> None:
        with gone():
            self._h2.send_headers(sid, headers, end_stream=end)
        if end:
            self._relayed.pop(sid, None)
        self._later()

    def relay_data(self, sid: int, data: bytes, ack: Any) -> None:
        self._outbox.send(sid, data, sent=ack)
        self._later()

    def relay_trailers(self, sid: int, trailers: Headers) -> None:
        self._relayed.pop(sid, None)
        self._outbox.send(sid, b"", trailers=trailers)
        self._later()

    def relay_end(self, sid: int) -> None:
        if self._relayed.pop(sid, None) is not None:
            self._outbox.send(sid, b"", end=True)
            self._later()

    def relay_reset(self, sid: int, code: int) -> None:
        self._relayed.pop(sid, None)
        self._outbox.drop(sid)
        with gone():
            self._h2.reset_stream(sid, code)
        self._later()

    def relay_lost(self, sids: list[tuple[int, bool]]) -> None:
        trailers = status_trailers(grpc.StatusCode.UNAVAILABLE, "The server is restarting its gRPC services; retry.")
        for sid, answered in sids:
            self._relayed.pop(sid, None)
            self._outbox.drop(sid)
            with gone():
                self._h2.send_headers(sid, trailers if answered else [*_RESPONSE_HEADERS[:2], *trailers],
                                      end_stream=True)
        self._later()


def _error(code: grpc.StatusCode, message: str) -> Answer:
    return Answer(None, status_trailers(code, message))


def _too_large(limit: int, size: int | None = None) -> Answer:
    got = f"{size} vs. {limit}" if size is not None else f"more than {limit}"
    return _error(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({got} bytes)")


class FrontServer:
    """The listening socket and its connections."""

    def __init__(self, config: FrontConfig) -> None:
        self.config = config
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, ssl: Any = None, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: FrontProtocol(self.config), host, port, ssl=ssl,
                                                reuse_port=reuse_port or None)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Stops listening, sends every connection a GOAWAY, waits up to ``grace_s`` for the calls
        in flight, then closes what is left."""
        self.config.stopping = True
        if self._server is not None:
            self._server.close()
        connections = self.config.connections
        for c in list(connections):
            c.drain()
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=grace_s)
        for c in list(connections):
            c.abort()
