"""One supervised engine server per model version (``llama-server``, ``vllm serve``): started on a
Unix socket in a private folder, or on a free loopback port, with a random API key (passed in its
environment, never on the command line), checked through ``/health``, restarted a bounded number
of times after a crash, and stopped with SIGTERM, then SIGKILL. Nothing here knows about models
beyond the command line it is given."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0
_TAIL_LINES = 12
_STABLE_S = 60.0  # a child healthy this long has its restart count reset


class ChildFailed(Exception):
    """The child exited or never became healthy; ``str()`` carries the reason and its last lines."""


class ServerProcess:
    """An engine server child. ``start()`` blocks until it is healthy; a crash afterwards is
    reported through ``state`` / ``reason`` and restarted up to ``restarts`` times with back-off.

    ``listen``: ``"uds"`` adds ``--host SOCKET`` (llama-server takes a socket path there);
    ``"tcp"`` adds ``--host 127.0.0.1 --port N`` with a free port. The key is put in each of
    ``key_env`` (the variables the servers read: ``LLAMA_API_KEY``, ``VLLM_API_KEY``)."""

    def __init__(self, binary: Path, *, name: str, startup_timeout_s: float, restarts: int,
                 label: str = "llama-server", listen: str = "uds",
                 key_env: tuple[str, ...] = ("LLAMA_API_KEY",)) -> None:
        self._binary = binary
        self.args: list[str] = []  # set before start(); the listen address is added
        self.label = label
        self._listen = listen
        self._key_env = key_env
        self._port = 0
        self._name = name
        self._startup_timeout_s = startup_timeout_s
        self._restarts = restarts
        # 0700: only this user reaches the socket and the files written for the child
        self.private_dir = Path(tempfile.mkdtemp(prefix=f"inhouse-{label.split('-')[0]}-"))
        self.socket = str(self.private_dir / "server.sock")
        self.api_key = secrets.token_urlsafe(32)
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._ready_at = 0.0
        self.on_failure: Callable[[str], None] | None = None  # called once restarts are used up
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.reason = ""
        self.last_crash = ""  # kept after a successful restart, for status and logs

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}" if self._listen == "tcp" else "http://child"

    @property
    def address(self) -> str | tuple[str, int]:
        """Where the child listens: its socket path, or (host, port)."""
        return ("127.0.0.1", self._port) if self._listen == "tcp" else self.socket

    def transport(self) -> httpx.HTTPTransport:
        return httpx.HTTPTransport() if self._listen == "tcp" else httpx.HTTPTransport(uds=self.socket)

    def async_transport(self) -> httpx.AsyncHTTPTransport:
        return httpx.AsyncHTTPTransport() if self._listen == "tcp" else httpx.AsyncHTTPTransport(uds=self.socket)

    def _address_args(self) -> list[str]:
        if self._listen != "tcp":
            return ["--host", self.socket]
        if not self._port:  # a free port, kept across restarts so clients' base URL stays valid
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self._port = s.getsockname()[1]
        return ["--host", "127.0.0.1", "--port", str(self._port)]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def start(self) -> None:
        """Start the child and wait until ``/health`` answers 200. Raises ``ChildFailed``; no child
        is left running then."""
        try:
            self._spawn_and_wait()
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name=f"{self.label}-{self._name}", daemon=True).start()

    def _spawn_and_wait(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self._tail.clear()
        env = {**os.environ, **dict.fromkeys(self._key_env, self.api_key)}
        proc = subprocess.Popen([str(self._binary), *self.args, *self._address_args()], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # a Ctrl-C meant for inhouse is not the child's
        self._proc = proc
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        deadline = time.monotonic() + self._startup_timeout_s
        with httpx.Client(transport=self.transport(), base_url=self.base_url, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    raise ChildFailed(f"{self.label} exited with status {proc.returncode} while starting"
                                      f"{self._tail_text()}")
                if self._stopping.is_set():
                    raise ChildFailed(f"{self.label} was stopped while starting.")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise ChildFailed(f"{self.label} did not become healthy within {self._startup_timeout_s:.0f} s"
                                      f"{self._tail_text()}")
                time.sleep(0.05)
        self.state, self.reason = "ready", ""
        self._ready_at = time.monotonic()
        log.info("engine server ready", extra={"model": self._name, "pid": proc.pid})

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """Read the child's output (so its pipe never fills) and keep the last lines for errors."""
        if proc.stdout is None:
            return
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._tail.append(line)
                log.debug("%s: %s", self.label, line, extra={"model": self._name})

    def _tail_text(self) -> str:
        lines = [line for line in self._tail if line.strip()][-6:]
        return (": " + " | ".join(lines)) if lines else "."

    def _watch(self) -> None:
        """Restart a crashed child with back-off (1, 2, 4 … s), at most ``restarts`` times in a row;
        then ``state`` is ``failed`` and requests are refused with the reason."""
        tries = 0
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None:
                return
            proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - self._ready_at > _STABLE_S:
                tries = 0  # it had recovered: this is a new crash, not the same one again
            tail = self._tail_text()
            self.state = "restarting"
            self.reason = self.last_crash = f"{self.label} exited with status {proc.returncode}{tail}"
            log.error("engine server crashed", extra={"model": self._name, "reason": self.reason})
            while not self._stopping.is_set():
                if tries >= self._restarts:
                    self.state = "failed"
                    self.reason = (f"{self.label} crashed and was restarted {tries} times without recovering; "
                                   f"last: {self.reason}")
                    log.error("engine server given up", extra={"model": self._name, "reason": self.reason})
                    if self.on_failure is not None:
                        self.on_failure(self.reason)
                    return
                tries += 1
                if self._stopping.wait(min(30.0, 2.0 ** (tries - 1))):
                    return
                try:
                    with self._lock:
                        if self._stopping.is_set():
                            return
                        self._spawn_and_wait()
                except ChildFailed as err:
                    self.reason = str(err)
                    self._kill()
                    continue
                break

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; removes the socket folder."""
        self._stopping.set()
        with self._lock:
            self._kill()
            self.state = "stopped"
        shutil.rmtree(self.private_dir, ignore_errors=True)

