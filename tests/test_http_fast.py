"""The HTTP fast path (transports/http/fast_path.py) answers v2 infer straight from the connection.
These tests speak raw HTTP/1.1 over sockets to a real server and check that it answers exactly
as the ASGI path does (a percent-encoded target is left to uvicorn and the ASGI entry, so both
paths are reachable on one server), and that the connection rules hold: keep-alive mixed with
other routes, pipelining in order, HTTP/1.0 and ``Connection: close``, body limits and
compression, malformed requests. (Graceful shutdown with requests in flight, and a
disconnect cancelling queued work, run through this path in test_graceful_shutdown.py and
test_scheduler.py.)"""

from __future__ import annotations

import gzip
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import RunningServer, run_server
from inhouse.transports.http.fast_path import FastInferProtocol
from models import add_model, write_model

_VOLATILE = {b"traceparent", b"x-request-id", b"date", b"server"}


def _body(n: int = 1, **extra: Any) -> bytes:
    x = [1.0] * (n * 4)
    return orjson.dumps({"inputs": [{"name": "a", "shape": [n, 4], "datatype": "FP32", "data": x},
                                    {"name": "b", "shape": [n, 4], "datatype": "FP32", "data": x}], **extra})


def _request(path: str, body: bytes, *, method: str = "POST", version: str = "HTTP/1.1",
             headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} {version}", "host: test", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn:
    """One client connection reading whole HTTP/1.1 responses (Content-Length framed)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
        n = int(headers[b"content-length"])
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """True once the server has closed the connection (and sent nothing more)."""
        self.sock.settimeout(10)
        return not self._fill()

    def close(self) -> None:
        self.sock.close()


def _exchange(url: str, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request on a fresh connection and its response."""
    conn = _Conn(url)
    try:
        conn.send(request)
        return conn.response()
    finally:
        conn.close()


def _stable(headers: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return sorted((k, v) for k, v in headers.items() if k not in _VOLATILE)


@pytest.fixture
def add_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    return repo


def test_fast_path_answers_like_the_asgi_path(add_repo: Path) -> None:
    # (body, headers, expected status, expected error code)
    cases: list[tuple[bytes, dict[str, str], int, bytes | None]] = [
        (_body(2), {"content-type": "application/json"}, 200, None),
        (_body(1, parameters={"binary_data_output": True}), {}, 200, None),
        (_body(100), {"accept-encoding": "gzip"}, 200, None),  # compressed answer
        (gzip.compress(_body(3)), {"content-encoding": "gzip"}, 200, None),  # compressed request
        (b"{not json", {}, 400, b"2001"),
        (_body(1).replace(b'"b"', b'"zz"'), {}, 400, b"2002"),  # unknown input
        (b"x" * 5000, {}, 413, b"2013"),  # over max_request_bytes
        (gzip.compress(b" " * 50_000), {"content-encoding": "gzip"}, 413, b"2013"),  # decompresses past it
        (b"{}", {"inference-header-content-length": "7"}, 400, b"2001"),  # binary extension, inconsistent
    ]
    with run_server(add_repo, gzip_min_bytes=1000, max_request_bytes=4096) as srv:
        conn = _Conn(srv.url)
        try:
            for body, headers, status, code in cases:
                conn.send(_request("/v2/models/add/infer", body, headers=headers))
                fast = conn.response()
                conn.send(_request("/v2/models/%61dd/infer", body, headers=headers))  # uvicorn + ASGI entry
                slow = conn.response()
                assert fast[0] == slow[0] == status, (body[:40], fast, slow)
                assert fast[2] == slow[2], body[:40]
                assert _stable(fast[1]) == _stable(slow[1]), body[:40]
                assert fast[1].get(b"inhouse-error-code") == code
                assert fast[1][b"traceparent"].startswith(b"00-") and fast[1][b"x-request-id"]
            conn.send(_request("/v2/models/add/infer", _body(100), headers={"accept-encoding": "gzip"}))
            _, h, body = conn.response()
            assert h[b"content-encoding"] == b"gzip"
            assert orjson.loads(gzip.decompress(body))["outputs"][0]["data"][:2] == [2.0, 2.0]
        finally:
            conn.close()
        # the plain targets took the fast path, the percent-encoded ones did not; neither did the
        # one declaring a body over the limit (uvicorn's path answers it before reading the body)
        assert _fast_answers(srv) == len(cases)


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(add_repo: Path) -> None:
    with run_server(add_repo, max_request_bytes=4096) as srv:
        conn = _Conn(srv.url)
        try:
            conn.send(b"POST /v2/models/add/infer HTTP/1.1\r\nhost: test\r\ncontent-length: 1000000000\r\n\r\n")
            conn.sock.settimeout(5)  # no body follows: the answer must not wait for it
            status, headers, _ = conn.response()
            assert status == 413 and headers[b"inhouse-error-code"] == b"2013"
        finally:
            conn.close()
        assert _exchange(srv.url, _request("/v2/models/add/infer", _body(1)))[0] == 200


def _fast_answers(srv: RunningServer) -> int:
    uv = srv.server._uvicorn
    assert uv is not None
    cls = uv.config.http_protocol_class
    assert issubclass(cls, FastInferProtocol)
    return cls.stats.answered


def test_fast_path_can_be_turned_off(add_repo: Path) -> None:
    with run_server(add_repo, http_fast_path=False) as srv:
        assert _exchange(srv.url, _request("/v2/models/add/infer", _body(1)))[0] == 200
        uv = srv.server._uvicorn
        assert uv is not None and not issubclass(uv.config.http_protocol_class, FastInferProtocol)


def test_keep_alive_pipelining_and_other_routes_share_a_connection(add_repo: Path) -> None:
    with run_server(add_repo) as srv:
        conn = _Conn(srv.url)
        try:
            # one write: infer, a route the application answers, infer, infer on a version
            conn.send(_request("/v2/models/add/infer", _body(1, id="one"))
                      + _request("/v2/models/add", b"", method="GET")
                      + _request("/v2/models/add/infer", _body(2, id="two"))
                      + _request("/v2/models/add/versions/1/infer", _body(1, id="three")))
            answers = [conn.response() for _ in range(4)]
            assert [a[0] for a in answers] == [200, 200, 200, 200]
            assert orjson.loads(answers[0][2])["id"] == "one"
            assert orjson.loads(answers[1][2])["name"] == "add"
            assert orjson.loads(answers[2][2])["id"] == "two"
            assert orjson.loads(answers[3][2])["id"] == "three"
            # still open afterwards; an unknown model is a coded 404 on the same connection
            conn.send(_request("/v2/models/nope/infer", _body(1)))
            status, h, _ = conn.response()
            assert status == 404 and h[b"inhouse-error-code"] == b"1002"
            conn.send(_request("/v2/models/add/infer", _body(1)))
            assert conn.response()[0] == 200
        finally:
            conn.close()
        # the first request and the last two took the fast path; those pipelined behind the GET were
        # queued by uvicorn and answered, in order, through the ASGI entry
        assert _fast_answers(srv) == 3


@pytest.mark.parametrize(("version", "headers"), [("HTTP/1.0", {}), ("HTTP/1.1", {"connection": "close"})])
def test_connection_closes_after_the_answer_when_asked(add_repo: Path, version: str,
                                                       headers: dict[str, str]) -> None:
    with run_server(add_repo) as srv:
        conn = _Conn(srv.url)
        try:
            conn.send(_request("/v2/models/add/infer", _body(1), version=version, headers=headers))
            status, h, body = conn.response()
            assert status == 200 and orjson.loads(body)["outputs"][0]["data"] == [2.0] * 4
            assert h[b"connection"] == b"close"
            assert conn.closed()
        finally:
            conn.close()


def test_malformed_http_gets_400_and_the_server_keeps_serving(add_repo: Path) -> None:
    with run_server(add_repo) as srv:
        bad = b"POST /v2/models/add/infer HTTP/1.1\r\nhost: x\r\ncontent-length: zz\r\n\r\n"
        assert _exchange(srv.url, bad)[0] == 400
        assert _exchange(srv.url, _request("/v2/models/add/infer", _body(1)))[0] == 200



def test_idle_keep_alive_connection_is_closed_after_the_timeout_busy_one_is_not(add_repo: Path) -> None:
    with run_server(add_repo) as srv:
        uv = srv.server._uvicorn
        assert uv is not None
        uv.config.timeout_keep_alive = 1  # read by each new connection
        busy, idle = _Conn(srv.url), _Conn(srv.url)
        try:
            idle.send(_request("/v2/models/add/infer", _body(1)))
            assert idle.response()[0] == 200
            busy.send(_request("/v2/models/add/infer", _body(1)))
            assert busy.response()[0] == 200
            for _ in range(4):  # active for 2 s, twice the timeout
                time.sleep(0.5)
                busy.send(_request("/v2/models/add/infer", _body(1)))
                assert busy.response()[0] == 200
            assert idle.closed()
            busy.send(_request("/v2/models/add/infer", _body(1)))
            assert busy.response()[0] == 200
        finally:
            busy.close()
            idle.close()
