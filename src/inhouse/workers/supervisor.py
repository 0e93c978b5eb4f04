"""The supervisor of ``workers: N``: it holds the ports, starts N worker processes (each a whole
server listening on the same ports with ``SO_REUSEPORT``, so the kernel spreads connections over
them), applies every model load and unload to all of them, adds their metrics up for
``/metrics``, restarts a worker that dies, and on SIGTERM lets every worker drain.

Workers share what lives on disk: the key store and the audit log are SQLite files that every
worker opens (a revoked key is seen by the next request in any worker; audit appends are
transactions that re-read the chain's head, so the chain has one order)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inhouse.errors import InhouseError
from inhouse.settings import ServerSettings
from inhouse.workers.control import Channel
from inhouse.workers.link import control_path
from inhouse.workers.placement import owner_of

log = logging.getLogger("inhouse.workers")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0  # a worker that ran this long before dying is restarted at once again
EXIT_GRACE_S = 15.0  # beyond drain_timeout_s, for a worker to close its stores and exit


PR_SET_CHILD_SUBREAPER = 36
ORPHAN_GRACE_S = 10.0


def become_subreaper() -> bool:
    """Make the engine servers a worker started (llama-server, vllm serve) ours when that worker
    dies (the kernel re-parents them here, not to init), so they can be stopped instead of
    holding their memory beside the restarted worker's own."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def orphans(workers: set[int]) -> list[int]:
    """Our children that are not workers: what dead workers left behind."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in workers:
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me:
            found.append(int(d.name))
    return found


def stop_orphans(pids: list[int], grace_s: float = ORPHAN_GRACE_S) -> None:
    """SIGTERM, SIGKILL after ``grace_s``, and reap them (blocking: run it in a thread)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.discard(pid)
        if left and time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        if left:
            time.sleep(0.05)


class SupervisorError(Exception):
    """The workers could not be started; the message says why."""


@dataclass(eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    started_at: float = 0.0
    failures: int = 0
    ever_ready: bool = False
    built: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """Bind (without listening) so that port 0 becomes a real port and nobody else takes it while
    workers restart; a bound socket that does not listen is never handed a connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise SupervisorError(
            f"Cannot listen for {what} on {host}:{port}: {err.strerror}. Another process may use the "
            f"port; stop it or choose another port (--{what.lower()}-port).") from None
    return sock


class Supervisor:
    def __init__(self, settings: ServerSettings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._workers = [_Worker(i) for i in range(count)]
        self._changes: dict[str, dict[str, Any]] = {}  # per model, the last lifecycle change applied
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopping = asyncio.Event()
        self._reserved: list[socket.socket] = []
        self._folder = Path(tempfile.mkdtemp(prefix="inhouse-workers-"))  # 0700: only we reach the socket
        self._worker_settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False  # every worker was ready once
        self._reaper = False  # orphaned grandchildren come to us (become_subreaper)

    # ---- running ----------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until SIGTERM / SIGINT; 0 after a clean stop, 1 when the workers could not start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._stopping.set)
        server = await asyncio.start_unix_server(self._connected, control_path(self._folder))
        self._reaper = become_subreaper()
        try:
            self._reserve_ports()
            if not await self._start_all():
                return 1
            self._running = True
            log.info("workers ready", extra={"workers": self.count, "pids": self.pids()})
            await self._stopping.wait()
            return 0
        except SupervisorError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            self._stopping.set()
            await self._stop_all()
            server.close()
            for sock in self._reserved:
                sock.close()
            shutil.rmtree(self._folder, ignore_errors=True)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc is not None and w.proc.returncode is None]

    def _reserve_ports(self) -> None:
        s = self.settings
        update: dict[str, Any] = {}
        http = reserve_port(s.host, s.http_port, "HTTP")
        self._reserved.append(http)
        update["http_port"] = http.getsockname()[1]
        if s.grpc.enabled:
            grpc = reserve_port(s.host, s.grpc_port, "gRPC")
            self._reserved.append(grpc)
            update["grpc_port"] = grpc.getsockname()[1]
        if s.metrics_port is not None:
            metrics = reserve_port(s.metrics_host or s.host, s.metrics_port, "metrics")
            self._reserved.append(metrics)
            update["metrics_port"] = metrics.getsockname()[1]
        self._worker_settings = s.model_copy(update=update)
        log.info("workers starting", extra={"workers": self.count, **update})

    async def _start_all(self) -> bool:
        """Every worker at once; each but the first builds its server only once the first has
        (which creates the secret, key store and audit log). True once every worker is ready."""
        for w in self._workers:
            await self._spawn(w)
        for w in self._workers:
            if not await self._until(w, w.ready):
                return False
        return True

    async def _until(self, w: _Worker, event: asyncio.Event) -> bool:
        """Wait for ``event``; False if the worker exited first or a stop was asked for."""
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(w.exited.wait()),
                 asyncio.ensure_future(self._stopping.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in waits:
            t.cancel()
        return event.is_set() and not self._stopping.is_set()

    async def _spawn(self, w: _Worker) -> None:
        w.built.clear()
        w.ready.clear()
        w.exited.clear()
        w.channel = None
        w.started_at = time.monotonic()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "inhouse.workers.child", control_path(self._folder), str(w.index), str(self.count),
            stdin=asyncio.subprocess.PIPE)
        stdin = w.proc.stdin
        if stdin is not None:  # the settings go down a pipe, as the worker cannot re-read flags
            stdin.write(self._worker_settings.model_dump_json().encode())
            stdin.close()
        self._background(self._watch(w, w.proc))

    async def _watch(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if w.proc is not proc:
            return
        w.channel = None
        w.exited.set()
        if self._stopping.is_set():
            return
        if not w.ever_ready:
            log.error("worker failed to start", extra={"worker": w.index, "exit_code": code})
            if not all(x.ever_ready for x in self._workers):
                return  # still starting: _start_all gives up
        if self._reaper:
            left = orphans(set(self.pids()))
            if left:
                log.warning("stopping what the worker left running", extra={"worker": w.index, "pids": left})
                await asyncio.to_thread(stop_orphans, left)
        ran = time.monotonic() - w.started_at
        w.failures = 0 if ran > STABLE_S else w.failures + 1
        delay = 0.0 if w.failures == 0 else RESTART_BACKOFF_S[min(w.failures, len(RESTART_BACKOFF_S)) - 1]
        log.error("worker exited; restarting it", extra={"worker": w.index, "pid": proc.pid, "exit_code": code,
                                                          "restart_in_s": delay})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        if not self._stopping.is_set():
            await self._spawn(w)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker (each drains its requests within drain_timeout_s), SIGKILL after."""
        live = [w.proc for w in self._workers if w.proc is not None and w.proc.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        limit = self.settings.drain_timeout_s + EXIT_GRACE_S
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), limit)
        except TimeoutError:
            for p in live:
                if p.returncode is None:
                    log.error("worker did not stop in time; killing it", extra={"pid": p.pid})
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in live))
        if self._reaper:
            await asyncio.to_thread(stop_orphans, orphans(set()))
        for t in list(self._tasks):
            t.cancel()

    def _background(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the control channel ------------------------------------------------------------------
    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        holder: dict[str, Channel] = {}

        async def handle(op: str, args: dict[str, Any]) -> Any:
            return await self._handle(holder["channel"], op, args)

        holder["channel"] = Channel(reader, writer, handle)

    async def _handle(self, channel: Channel, op: str, args: dict[str, Any]) -> Any:
        if op == "may_build":
            first = self._workers[0]
            if int(args["index"]) != 0 and not first.ever_ready:
                await first.built.wait()
            return None
        if op in ("built", "ready"):
            w = self._workers[int(args["index"])]
            w.channel = channel
            if op == "built":
                w.built.set()
            else:
                w.ever_ready = True
                w.ready.set()
                if self._running:  # a restarted one
                    log.info("worker ready", extra={"worker": w.index, "pid": args.get("pid")})
            return None
        if op == "changes":
            return list(self._changes.values())
        if op == "change":
            return await self._apply_everywhere(channel, dict(args["change"]))
        if op == "metrics":
            return await self._expositions()
        raise ValueError(f"unknown control operation {op!r}")

    def _connected_workers(self) -> list[_Worker]:
        return [w for w in self._workers if w.channel is not None and not w.channel.closed.is_set()]

    async def _apply_everywhere(self, origin: Channel, change: dict[str, Any]) -> list[int]:
        """One load / unload, applied by every worker before anyone is answered; the first
        failure is the answer (workers that applied it keep what they loaded)."""
        name = str(change["name"])
        async with self._locks.setdefault(name, asyncio.Lock()):
            workers = self._connected_workers()
            # the token tells the asking worker which of its results to answer with
            recorded = {k: v for k, v in change.items() if k != "token"}

            def send(c: Channel) -> Any:
                return c.request("apply", change=change if c is origin else recorded)

            # the worker that would hold the model (placement: one) first: the others' stand-ins
            # then find it loaded (or not, with its reason), and a failure there stops the change
            owner = self._workers[owner_of(name, self.count)]
            first = [owner.channel] if owner in workers and owner.channel is not None else []
            rest = [w.channel for w in workers if w is not owner and w.channel is not None]
            results: list[Any] = list(await asyncio.gather(*(send(c) for c in first), return_exceptions=True))
            if not any(isinstance(r, BaseException) for r in results):
                results += await asyncio.gather(*(send(c) for c in rest), return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if len(failures) < len(results):  # applied somewhere: a worker started later applies it too
                self._changes.pop(name, None)
                self._changes[name] = recorded
            for r in failures:
                if isinstance(r, InhouseError):
                    raise r
            if failures:
                raise failures[0]
            versions: list[int] = results[0] if results else []
            return versions

    async def _expositions(self) -> list[str]:
        async def one(c: Channel) -> str | None:
            try:
                text: str = await c.request("exposition", limit_s=10)
                return text
            except Exception:  # a worker that is restarting is left out of this scrape
                return None

        texts = await asyncio.gather(*(one(w.channel) for w in self._connected_workers() if w.channel is not None))
        return [t for t in texts if t is not None]


def run_workers(settings: ServerSettings, count: int) -> int:
    """Run the supervisor until it is stopped; the process exit code."""
    coro = Supervisor(settings, count).run()
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
