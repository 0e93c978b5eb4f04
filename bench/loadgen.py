"""A light closed-loop load generator, run as its own process so it competes for the CPU as
little as possible: ``concurrency`` keep-alive HTTP/1.1 connections, each sending the same
pre-built request as soon as the previous answer arrived. Responses are parsed with raw
asyncio protocols (no HTTP library), so a request costs the generator a few microseconds.

Transports are pluggable: ``TRANSPORTS[name](args, payload) -> Result``. REST is built in; a
gRPC transports (``grpc``: grpcio; ``grpc-h2load``: nghttp2's h2load) register themselves from
``bench/grpc_transport.py`` when that module exists.

    python bench/loadgen.py --url http://127.0.0.1:8000 --model mlp --payload mlp.json -c 64 -d 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse


@dataclass
class Result:
    transport: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    server_cpu_us_per_req: float | None = None
    server_loop_cpu_us_per_req: float | None = None  # the server's main thread (its event loop) alone
    loadgen_cpu_us_per_req: float | None = None


def summarize(transport: str, concurrency: int, seconds: float, latencies: list[float], errors: int,
              statuses: dict[str, int]) -> Result:
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return Result(transport, concurrency, round(seconds, 3), len(lat), errors, round(len(lat) / seconds, 1),
                  round(pct(0.5), 3), round(pct(0.9), 3), round(pct(0.99), 3), statuses)


class _Conn(asyncio.Protocol):
    """One keep-alive connection sending the request again whenever an answer completes."""

    def __init__(self, request: bytes, gen: _RestLoad) -> None:
        self.request = request
        self.gen = gen
        self.buf = bytearray()
        self.need = -1
        self.status = b""
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.gen.stop or self.transport is None:
            return
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                self.status = head[9:12]
                i = head.find(b"\r\ncontent-length:")
                if i < 0:
                    self.gen.fail(b"no-length")
                    self.transport.close()  # type: ignore[union-attr]
                    return
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17:j if j > 0 else len(head)])
                del self.buf[:end + 4]
                self.need = length
            if len(self.buf) < self.need:
                return
            del self.buf[:self.need]
            self.need = -1
            self.gen.done(self.status, time.perf_counter() - self.sent)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.gen.stop:
            self.gen.fail(b"closed")


class _RestLoad:
    def __init__(self, warmup_until: float, stop_at: float) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.statuses: dict[str, int] = {}
        self.stop = False
        self.warmup_until = warmup_until
        self.stop_at = stop_at
        self.finished = asyncio.get_running_loop().create_future()

    def done(self, status: bytes, latency: float) -> None:
        now = time.perf_counter()
        if now >= self.stop_at:
            self.stop = True
            if not self.finished.done():
                self.finished.set_result(None)
            return
        if now < self.warmup_until:
            return
        s = status.decode()
        self.statuses[s] = self.statuses.get(s, 0) + 1
        if status == b"200":
            self.latencies.append(latency)
        else:
            self.errors += 1

    def fail(self, why: bytes) -> None:
        self.errors += 1
        self.statuses[why.decode()] = self.statuses.get(why.decode(), 0) + 1


def rest_request(url: str, model: str, payload: dict[str, object], extra: list[str] | None = None) -> bytes:
    """A v2 infer request; tensors given as ``{"binary": true}`` go in the binary extension;
    ``extra`` header lines ("Name: value") are added as given (e.g. an API key)."""
    u = urlparse(url)
    header = json.dumps(payload["header"]).encode()
    blob = bytes.fromhex(str(payload.get("binary_hex", "")))
    headers = [f"POST /v2/models/{model}/infer HTTP/1.1", f"Host: {u.hostname}:{u.port}",
               "Content-Type: application/" + ("octet-stream" if blob else "json"),
               f"Content-Length: {len(header) + len(blob)}"]
    if blob:
        headers.append(f"Inference-Header-Content-Length: {len(header)}")
    headers.extend(extra or ())
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + header + blob


def _stat(path: str) -> tuple[int, int] | None:
    """Parent pid and CPU ticks (user + system) from a /proc stat file; None once it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU seconds the server (its process and its child processes, such as the audit writer)
    and this process spend during the measured window: under a contended machine, CPU per
    request is steadier than requests per second."""

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.marks: list[tuple[float, float, float]] = []

    def _server_cpu(self) -> tuple[float, float]:
        """CPU seconds of the server with its children, and of its main thread alone."""
        if self.pid is None:
            return 0.0, 0.0
        main = _stat(f"/proc/{self.pid}/task/{self.pid}/stat")
        ticks = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _stat(f"/proc/{entry}/stat")) is not None \
                    and self.pid in (int(entry), stat[0]):
                ticks += stat[1]
        tick = os.sysconf("SC_CLK_TCK")
        return ticks / tick, (main[1] if main is not None else 0) / tick

    def mark(self) -> None:
        self.marks.append((*self._server_cpu(), time.process_time()))

    def apply(self, result: Result) -> Result:
        if len(self.marks) == 2 and result.requests:
            (s0, m0, l0), (s1, m1, l1) = self.marks
            if self.pid is not None:
                result.server_cpu_us_per_req = round((s1 - s0) / result.requests * 1e6, 1)
                result.server_loop_cpu_us_per_req = round((m1 - m0) / result.requests * 1e6, 1)
            result.loadgen_cpu_us_per_req = round((l1 - l0) / result.requests * 1e6, 1)
        return result


def schedule_cpu_marks(args: argparse.Namespace) -> CpuMeter:
    meter = CpuMeter(args.server_pid)
    loop = asyncio.get_running_loop()
    loop.call_later(args.warmup, meter.mark)
    loop.call_later(args.warmup + args.duration, meter.mark)
    return meter


async def run_rest(args: argparse.Namespace, payload: dict[str, object]) -> Result:
    u = urlparse(args.url)
    request = rest_request(args.url, args.model, payload, getattr(args, "header", None))
    start = time.perf_counter()
    gen = _RestLoad(start + args.warmup, start + args.warmup + args.duration)
    loop = asyncio.get_running_loop()
    meter = schedule_cpu_marks(args)
    conns = [await loop.create_connection(lambda: _Conn(request, gen), u.hostname, u.port)
             for _ in range(args.concurrency)]
    await asyncio.wait_for(gen.finished, args.warmup + args.duration + 60)
    for transport, _ in conns:
        transport.close()
    return meter.apply(summarize("rest", args.concurrency, args.duration, gen.latencies, gen.errors, gen.statuses))


TRANSPORTS: dict[str, Callable[[argparse.Namespace, dict[str, object]], Awaitable[Result]]] = {"rest": run_rest}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http://host:port (REST) or host:port (gRPC)")
    p.add_argument("--model", required=True)
    p.add_argument("--payload", required=True, type=Path, help="JSON written by bench/run.py")
    p.add_argument("--transport", default="rest")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--server-pid", type=int, default=None, help="report the server's CPU time per request")
    p.add_argument("--header", action="append", default=[], help="extra request header 'Name: value' (gRPC: call "
                   "metadata; repeatable), e.g. 'Authorization: Bearer KEY'")
    args = p.parse_args(argv)
    if args.transport not in TRANSPORTS:
        try:
            # grpc and grpc-h2load both live in grpc_transport.py
            importlib.import_module(f"{args.transport.partition('-')[0]}_transport")
        except ImportError:
            sys.exit(f"unknown transport {args.transport!r}; available: {sorted(TRANSPORTS)}")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    payload = json.loads(args.payload.read_text())
    result = asyncio.run(TRANSPORTS[args.transport](args, payload))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
