"""Sending on HTTP/2 streams within the peer's flow-control windows: what does not fit yet waits
in an :class:`Outbox` until a WINDOW_UPDATE lets it through. The front (``front.py``) sends its
answers through one per public connection and relays forwarded streams through one on each side,
so a slow reader on either side stops the other side by its window rather than by our memory."""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Callable

import h2.connection
import h2.exceptions
from h2.connection import ConnectionInputs
from h2.stream import StreamInputs, StreamState

Headers = list[tuple[bytes, bytes]]
Sent = Callable[[int], None]
"""Called with the number of bytes of a chunk once they are handed to h2 (the relay's cue to
acknowledge them to the side they came from)."""


# HTTP/2 frame types and flags (RFC 9113, section 6) of the frames ``Outbox.unary`` writes itself
_DATA, _HEADERS = 0x0, 0x1
_END_STREAM, _END_HEADERS = 0x1, 0x4

_GONE = contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError)


def gone() -> contextlib.suppress:
    """Sends on a stream the peer reset, or on a closed connection: nothing left to send there.
    (One shared ``suppress``, which keeps no state: a generator-based context manager cost a few
    microseconds per use, several times per call.)"""
    return _GONE


class _Pending:
    __slots__ = ("chunks", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[tuple[bytes, Sent | None]] = deque()
        self.end = False
        self.trailers: Headers | None = None


class Outbox:
    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self.conn = conn
        self._pending: dict[int, _Pending] = {}

    def send(self, sid: int, data: bytes, *, sent: Sent | None = None, end: bool = False,
             trailers: Headers | None = None) -> None:
        """``data`` on stream ``sid``, then, when asked, the end of the stream or ``trailers``."""
        pending = self._pending.get(sid)
        if pending is None:
            conn = self.conn
            if not data or len(data) <= min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size):
                with gone():  # the common case: it fits at once
                    self._finish_now(sid, data, sent, end, trailers)
                return
            pending = self._pending[sid] = _Pending()
        if data:
            pending.chunks.append((data, sent))
        pending.end = pending.end or end
        if trailers is not None:
            pending.trailers = trailers
        self.drain(sid)

    def _finish_now(self, sid: int, data: bytes, sent: Sent | None, end: bool, trailers: Headers | None) -> None:
        conn = self.conn
        if data:
            conn.send_data(sid, data, end_stream=end and trailers is None)
            if sent is not None:
                sent(len(data))
        elif end and trailers is None:
            conn.end_stream(sid)
        if trailers is not None:
            conn.send_headers(sid, trailers, end_stream=True)

    def unary(self, sid: int, head: bytes, message: bytes, trailers: Headers) -> bool:
        """A whole unary answer at once: HEADERS (``head``, an HPACK block that leaves the dynamic
        table alone), one DATA frame with ``message`` and the trailers ending the stream, framed
        here with h2's stream and connection state moved exactly as its ``send_headers`` /
        ``send_data`` would. False (nothing sent) unless it fits the windows and one frame each,
        on a stream whose request has ended and with nothing else waiting for it: then the
        general path does it. h2 builds every frame as an object and re-checks each header; for
        the three frames of an answer that was most of the front's sending cost."""
        conn = self.conn
        stream = conn.streams.get(sid)
        n = len(message)
        if (stream is None or sid in self._pending or stream.state_machine.state is not StreamState.HALF_CLOSED_REMOTE
                or n > stream.outbound_flow_control_window or n > conn.outbound_flow_control_window):
            return False
        encoder = conn.encoder
        limit = conn.max_outbound_frame_size
        if encoder.header_table.resized or n > limit or len(head) > limit:
            return False
        block = encoder.encode(trailers)
        if len(block) > limit:
            return False
        machine, smachine = conn.state_machine, stream.state_machine
        machine.process_input(ConnectionInputs.SEND_HEADERS)
        smachine.process_input(StreamInputs.SEND_HEADERS)
        machine.process_input(ConnectionInputs.SEND_DATA)
        smachine.process_input(StreamInputs.SEND_DATA)
        stream.outbound_flow_control_window -= n
        conn.outbound_flow_control_window -= n
        machine.process_input(ConnectionInputs.SEND_HEADERS)
        smachine.process_input(StreamInputs.SEND_HEADERS)
        smachine.process_input(StreamInputs.SEND_END_STREAM)
        conn._data_to_send += b"".join((  # h2's output buffer, so frames keep their order
            _frame_head(len(head), _HEADERS, _END_HEADERS, sid), head,
            _frame_head(n, _DATA, 0, sid), message,
            _frame_head(len(block), _HEADERS, _END_HEADERS | _END_STREAM, sid), block))
        return True

    @property
    def busy(self) -> bool:
        """Whether anything waits for a window."""
        return bool(self._pending)

    def drop(self, sid: int) -> None:
        self._pending.pop(sid, None)

    def drain(self, sid: int | None = None) -> None:
        """Send what the windows now allow, on ``sid`` or on every stream waiting."""
        sids = list(self._pending) if sid is None else [sid] if sid in self._pending else []
        conn = self.conn
        for s in sids:
            pending = self._pending[s]
            try:
                while pending.chunks:
                    data, sent = pending.chunks[0]
                    size = min(conn.local_flow_control_window(s), conn.max_outbound_frame_size, len(data))
                    if size <= 0:
                        break
                    conn.send_data(s, data[:size])
                    if sent is not None:
                        sent(size)
                    if size == len(data):
                        pending.chunks.popleft()
                    else:
                        pending.chunks[0] = (data[size:], sent)
                if pending.chunks:
                    continue
                if pending.trailers is not None:
                    conn.send_headers(s, pending.trailers, end_stream=True)
                elif pending.end:
                    conn.end_stream(s)
                else:
                    continue  # more may come: keep the (empty) entry so order is kept
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            del self._pending[s]


_HEAD = struct.Struct(">IBI")


def _frame_head(length: int, kind: int, flags: int, sid: int) -> bytes:
    """A frame's 9-byte header: 24-bit length, type, flags, stream id (RFC 9113, 4.1)."""
    return _HEAD.pack(length << 8 | kind, flags, sid)
