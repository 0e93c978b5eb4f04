"""Shared fixtures: a real inhouse server on free ports, run in a background thread."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# servers the tests start (here and as `inhouse serve` subprocesses, which inherit this) run one
# process unless the test is about workers (or INHOUSE_WORKERS is set on purpose)
os.environ.setdefault("INHOUSE_WORKERS", "1")

from inhouse.server import InhouseServer
from inhouse.settings import load_settings
from models import add_model, identity_model, mlp_model, write_model

# LLM test models; CI import skips; the redis-server of the response-cache tests
pytest_plugins = ["llm_fixtures", "llm_api_fixtures", "ci_required", "redis_fixture"]


def wait_until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``cond`` until it is true; AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


class RunningServer:
    """A started InhouseServer and the loop it runs on."""

    def __init__(self, server: InhouseServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.url = server.http_url
        self.grpc_port = server.grpc_port
        self.grpc_target = server.grpc_target  # "127.0.0.1:PORT", or None when gRPC is off

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. manager calls) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30), **kw)


@contextmanager
def run_server(repo: Path, **settings: Any) -> Iterator[RunningServer]:
    """Start a real server (REST and gRPC on free ports)."""
    settings.setdefault("http_port", 0)
    settings.setdefault("grpc_port", 0)
    settings.setdefault("data_dir", repo.parent / "data")
    s = load_settings(None, repo=repo, **settings)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        try:
            server = InhouseServer(s)
            holder["server"] = server
            await server.start()
        except BaseException as err:
            holder["error"] = err
            started.set()
            return
        started.set()
        await server.wait_stopped()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    if not started.wait(120):
        raise TimeoutError("server did not start")
    if "error" in holder:
        thread.join(5)
        loop.close()
        raise holder["error"]
    server: InhouseServer = holder["server"]
    try:
        yield RunningServer(server, loop)
    finally:
        fut = asyncio.run_coroutine_threadsafe(server.stop(), loop)
        try:
            fut.result(60)
        finally:
            thread.join(30)
            loop.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with a few tiny models: 'add' (two FP32 inputs), 'mlp' (32 → 2),
    'echo-str' (BYTES identity) and 'echo-i64' (INT64 identity)."""
    root = tmp_path / "models"
    root.mkdir()
    write_model(root, "add", add_model(), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]},
        checksum=True)
    write_model(root, "mlp", mlp_model())
    write_model(root, "echo-str", identity_model(8))  # TensorProto.STRING
    write_model(root, "echo-i64", identity_model(7))  # TensorProto.INT64
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[RunningServer]:
    with run_server(repo) as srv:
        yield srv


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """For tests that need their own settings: ``with server_factory(repo, **settings) as s``."""
    yield run_server
