"""Slow and oversized HTTP clients are cut off: a connection that says nothing, headers or a
body trickled slower than ``header_timeout_s`` / ``body_timeout_s`` allow (408, code 2014),
headers over ``max_header_bytes`` (431, code 2015), and a gzip body that would inflate past
``max_request_bytes`` (413, code 2013), on the fast infer path and through the ASGI app alike.
Raw sockets, because an HTTP client library sends whole requests."""

from __future__ import annotations

import gzip
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import RunningServer, run_server

LIMITS = {"header_timeout_s": 0.5, "body_timeout_s": 0.5, "max_header_bytes": 2048}


@pytest.fixture(scope="module", params=[True, False], ids=["fast-path", "asgi"])
def limited_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from models import add_model, write_model

    repo = tmp_path_factory.mktemp("slow") / "models"
    repo.mkdir()
    write_model(repo, "add", add_model(), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]})
    with run_server(repo, load="add", http_fast_path=request.param, max_request_bytes=1 << 20, **LIMITS) as srv:
        yield srv


def _connect(srv: RunningServer) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.server.http_port), timeout=5)
    return s


def _trickle(s: socket.socket, byte: bytes) -> None:
    """A byte every 0.2 s until the server answers (or 3 s: the test then fails on the reply);
    nothing is sent after its answer, so that a reset does not discard the answer unread."""
    end = time.monotonic() + 3
    while time.monotonic() < end:
        if select.select([s], [], [], 0.2)[0]:
            return
        try:
            s.sendall(byte)
        except OSError:
            return


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout fails the test)."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_a_silent_connection_is_closed(limited_server: RunningServer) -> None:
    with _connect(limited_server) as s:
        start = time.monotonic()
        assert _read_all(s) == b""
        assert time.monotonic() - start < 3


@pytest.mark.parametrize("path", ["/v2/models/add/infer", "/v2/health/live"])
def test_headers_trickled_get_408(limited_server: RunningServer, path: str) -> None:
    with _connect(limited_server) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\n".encode())
        _trickle(s, b"x")  # still sending, too slowly
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"inhouse-error-code: 2014" in reply and b"header_timeout_s" in reply


@pytest.mark.parametrize("path", ["/v2/models/add/infer", "/v2/repository/index"])
def test_a_body_trickled_gets_408(limited_server: RunningServer, path: str) -> None:
    with _connect(limited_server) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  "content-length: 100\r\n\r\n{".encode())
        start = time.monotonic()
        _trickle(s, b" ")
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"inhouse-error-code: 2014" in reply and time.monotonic() - start < 3


def test_headers_over_the_limit_get_431(limited_server: RunningServer) -> None:
    head = "".join(f"x-h{i}: {'v' * 20}\r\n" for i in range(100))  # ~3 KB > 2048
    with _connect(limited_server) as s:
        s.sendall(f"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n{head}\r\n".encode())
        reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b"inhouse-error-code: 2015" in reply and b"max_header_bytes" in reply


def test_requests_within_the_limits_are_served(limited_server: RunningServer) -> None:
    """Keep-alive requests slower than the header timeout apart are not cut (idle is not slow)."""
    doc = {"inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} for n in "ab"]}
    with httpx.Client(base_url=limited_server.url, timeout=5) as c:
        for _ in range(2):
            r = c.post("/v2/models/add/infer", json=doc, headers={"x-pad": "p" * 1000})
            assert r.status_code == 200, r.text
            time.sleep(0.7)
        assert c.get("/v2/health/live").status_code == 200


def test_a_gzip_bomb_gets_413_without_inflating(limited_server: RunningServer, tmp_path: Path) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 KB that inflates to 64 MiB > 1 MiB
    with httpx.Client(base_url=limited_server.url, timeout=10) as c:
        for path in ("/v2/models/add/infer", "/v1/chat/completions"):
            r = c.post(path, content=bomb, headers={"content-encoding": "gzip", "content-type": "application/json"})
            assert r.status_code == 413 and r.headers["inhouse-error-code"] == "2013", (path, r.text)
