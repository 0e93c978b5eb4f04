"""A real redis-server for the response-cache tests, started on a free port with persistence
off. The binary is ``INHOUSE_REDIS_SERVER``, else ``redis-server`` on PATH, else the one
``scripts/redis_server.sh`` unpacks; under CI=true a missing one fails the test instead of
skipping it (scripts/test.sh fetches it there)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def redis_binary() -> str:
    for candidate in (os.environ.get("INHOUSE_REDIS_SERVER"), shutil.which("redis-server"),
                      str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                          / "inhouse/redis/bin/redis-server")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    reason = "redis-server is not installed; run scripts/redis_server.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}. CI=true runs it, so this must not skip.")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary, self.port, self.workdir = binary, port, workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()
