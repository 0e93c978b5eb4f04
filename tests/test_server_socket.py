"""The listening socket must make asyncio disable Nagle on accepted connections; without it,
every small response under the standard event loop waited ~40 ms for a delayed ACK."""

from __future__ import annotations

import socket

from inhouse.server import bind_socket


def test_listening_socket_is_tcp_with_nodelay() -> None:
    sock = bind_socket("127.0.0.1", 0, "HTTP")
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio's _set_nodelay checks exactly this
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()
