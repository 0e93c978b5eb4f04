"""The gRPC front's HTTP/2 connection (``transports/grpc/h2_connection.py``) against h2's own,
driven by a real h2 client: the same streams are refused at the concurrency limit, and closed
streams are still forgotten while the open-stream count skips h2's walk."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from inhouse.transports.grpc.h2_connection import Connection

_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
            (b":authority", b"localhost"), (b"te", b"trailers"), (b"content-type", b"application/grpc")]


class _Pair:
    """A client and a server connection of class ``server_cls``, handshake and settings done."""

    def __init__(self, server_cls: type[h2.connection.H2Connection], limit: int) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.server = server_cls(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.server.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
        self.client.initiate_connection()
        self.server.initiate_connection()
        for _ in range(2):
            self.server.receive_data(self.client.data_to_send())
            self.client.receive_data(self.server.data_to_send())
        assert self.server.local_settings.max_concurrent_streams == limit

    def open(self) -> int:
        """A request the client leaves open; its stream id once the server took it."""
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, _HEADERS)
        events = self.server.receive_data(self.client.data_to_send())
        assert [type(e) for e in events] == [h2.events.RequestReceived]
        return sid

    def finish(self, sid: int) -> None:
        """The client ends its side, the server answers and ends its own: the stream is closed."""
        self.client.end_stream(sid)
        self.server.receive_data(self.client.data_to_send())
        self.server.send_headers(sid, [(b":status", b"200"), (b"grpc-status", b"0")], end_stream=True)
        self.client.receive_data(self.server.data_to_send())
        assert self.server.streams[sid].closed if sid in self.server.streams else True


@pytest.mark.parametrize("server_cls", [h2.connection.H2Connection, Connection], ids=["h2", "ours"])
def test_the_stream_over_the_limit_is_refused_and_closing_one_makes_room(
        server_cls: type[h2.connection.H2Connection]) -> None:
    pair = _Pair(server_cls, limit=40)  # above the streams held before the first walk
    sids = [pair.open() for _ in range(40)]
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        pair.open()

    pair = _Pair(server_cls, limit=40)
    sids = [pair.open() for _ in range(40)]
    for sid in sids[:25]:
        pair.finish(sid)
    # closed streams do not count, though they may still be held
    sids = [pair.open() for _ in range(25)]
    assert pair.server.open_inbound_streams == 40
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        pair.open()


def test_a_small_limit_is_held_before_any_walk() -> None:
    pair = _Pair(Connection, limit=3)
    sids = [pair.open() for _ in range(3)]
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        pair.open()
    pair = _Pair(Connection, limit=3)
    sids = [pair.open() for _ in range(3)]
    pair.finish(sids[0])
    pair.open()


def test_closed_streams_are_forgotten_and_the_limit_is_exact_with_closed_ones_held() -> None:
    pair = _Pair(Connection, limit=1024)
    held_most = 0
    in_flight: list[int] = []
    for _ in range(5050):
        in_flight.append(pair.open())
        if len(in_flight) == 100:
            for sid in in_flight:
                pair.finish(sid)
            in_flight.clear()
        held_most = max(held_most, len(pair.server.streams))
        assert pair.server.open_inbound_streams >= len(in_flight)  # never fewer than are open
    # never more than twice the open streams of a walk, plus those held before the first one
    assert held_most <= 2 * 100 + 32 + 100
    # 50 open: exactly 974 more are taken, whatever closed streams are still held
    for _ in range(1024 - 50):
        pair.open()
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        pair.open()
