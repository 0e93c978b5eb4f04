"""The gRPC transport for the load generator of the scheduling benchmarks
(``bench/loadgen.py --transport grpc``, ``bench/run.py --transport rest,grpc``): the same
request the REST transport sends (v2 header + binary tensor data), as a KServe v2
``ModelInferRequest`` with ``raw_input_contents``, from ``concurrency`` closed-loop callers
on one grpc.aio channel. ``bench/bench_grpc.py`` is the self-contained gRPC benchmark."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc

# bench/loadgen.py (the scheduling benchmarks' load generator), imported by name so that this
# file lints the same before and after it lands beside it.
loadgen = importlib.import_module("loadgen")


def grpc_request(model: str, payload: dict[str, Any]) -> Any:
    """The payload's v2 header and binary blob as a ModelInferRequest (raw contents)."""
    blob = bytes.fromhex(str(payload.get("binary_hex", "")))
    req = pb.ModelInferRequest(model_name=model)
    offset = 0
    for t in payload["header"]["inputs"]:
        size = t["parameters"]["binary_data_size"]
        req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        req.raw_input_contents.append(blob[offset:offset + size])
        offset += size
    return req


def call_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """``--header 'Name: value'`` as call metadata (e.g. 'Authorization: Bearer KEY')."""
    return tuple((name.strip().lower(), value.strip()) for name, _, value in (h.partition(":") for h in args.header))


def grpc_target(args: argparse.Namespace) -> str:
    """``--url`` as grpcio's host:port."""
    return str(args.url).removeprefix("grpc://").removeprefix("http://")


async def run_grpc(args: argparse.Namespace, payload: dict[str, Any]) -> Any:
    request = grpc_request(args.model, payload)
    metadata, target = call_metadata(args), grpc_target(args)
    start = time.perf_counter()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    meter = loadgen.schedule_cpu_marks(args)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()

    def note(t0: float, code: str) -> None:
        if t0 >= measure_from:
            statuses[code] += 1
            if code == "OK":
                latencies.append(time.perf_counter() - t0)

    if args.concurrency == 1:
        # one caller: grpcio's blocking stub, which waits inside grpc's C core. The aio client
        # costs ~0.5 ms of CPU per call, on the same cores as the server (enough to slow a model
        # whose onnxruntime threads use both).
        with grpc.insecure_channel(target) as sync_channel:
            sync_infer = pb_grpc.GRPCInferenceServiceStub(sync_channel).ModelInfer

            def blocking_caller() -> None:
                while (t0 := time.perf_counter()) < stop_at:
                    try:
                        sync_infer(request, metadata=metadata)
                        code = "OK"
                    except grpc.RpcError as err:
                        code = err.code().name  # type: ignore[attr-defined]  # grpc's call errors have it
                    note(t0, code)

            await asyncio.to_thread(blocking_caller)
    else:
        async with grpc.aio.insecure_channel(target) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer

            async def caller() -> None:
                while (t0 := time.perf_counter()) < stop_at:
                    try:
                        await infer(request, metadata=metadata)
                        code = "OK"
                    except grpc.aio.AioRpcError as err:
                        code = err.code().name
                    note(t0, code)

            await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    errors = sum(n for code, n in statuses.items() if code != "OK")
    return meter.apply(loadgen.summarize("grpc", args.concurrency, args.duration, latencies, errors, dict(statuses)))


def _h2load(h2load: str, url: str, body: Path, headers: list[str], concurrency: int, seconds: float,
            log: Path | None = None) -> str:
    """One h2load run: one HTTP/2 connection with ``concurrency`` streams (as one gRPC channel),
    closed loop, for ``seconds``; returns h2load's report."""
    cmd = [h2load, "-c", "1", "-m", str(concurrency), "-D", f"{max(1, round(seconds * 1000))}ms",
           "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    for h in headers:
        cmd += ["-H", h]
    if log is not None:
        cmd += ["--log-file", str(log)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"h2load failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout


async def run_grpc_h2load(args: argparse.Namespace, payload: dict[str, Any]) -> Any:
    """The same ``ModelInfer`` calls sent by h2load (nghttp2's HTTP/2 load generator, C; Debian
    package ``nghttp2-client``) as gRPC frames over HTTP/2, so the client costs the shared cores
    a few tens of microseconds per call instead of grpcio's 200-600.

    h2load knows HTTP, not gRPC: an error comes back as HTTP 200 with a ``grpc-status`` trailer
    and no message. So one call through grpcio first must succeed (it also gives the size of an
    answer), and a measured call counts as answered only when the response bytes h2load received
    hold one answer per call; the shortfall is reported as errors."""
    h2load = shutil.which("h2load")
    if h2load is None:
        sys.exit("grpc-h2load needs h2load on PATH (Debian/Ubuntu: apt-get install nghttp2-client)")
    request = grpc_request(args.model, payload)
    metadata, target = call_metadata(args), grpc_target(args)
    with grpc.insecure_channel(target) as channel:
        try:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata)
        except grpc.RpcError as err:
            sys.exit(f"the first call, through grpcio, failed: {err.code().name}: {err.details()}")  # type: ignore[attr-defined]
    answer_bytes = 5 + answer.ByteSize()  # gRPC frame: compressed flag, length, message
    message = request.SerializeToString()
    url = f"http://{target}/{SERVICE}/ModelInfer"
    headers = [f"{name}: {value}" for name, value in metadata]
    with tempfile.TemporaryDirectory() as tmp:
        body, log = Path(tmp) / "request.grpc", Path(tmp) / "log.tsv"
        body.write_bytes(struct.pack(">BI", 0, len(message)) + message)
        if args.warmup > 0:  # a run of its own: h2load's byte counts include its warm-up phase
            _h2load(h2load, url, body, headers, args.concurrency, args.warmup)
        meter = loadgen.CpuMeter(args.server_pid)
        meter.mark()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = _h2load(h2load, url, body, headers, args.concurrency, args.duration, log)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        meter.mark()
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    received = int(m.group(1)) if (m := re.search(r"\((\d+)\) data", report)) else 0
    statuses: Counter[str] = Counter(f"HTTP {status}" for _, status, _ in rows if status != "200")
    answered = [int(us) / 1e6 for _, status, us in rows if status == "200"]
    missing = max(0, len(answered) - received // answer_bytes)
    if missing:
        statuses["no answer (grpc-status in trailers)"] = missing
    # streams h2load saw fail (reset, connection error, timeout) have no line in its log
    if (m := re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", report)) and (lost := sum(map(int, m.groups()))):
        statuses["failed in h2load"] = lost
    statuses["OK"] = len(answered) - missing
    errors = sum(n for code, n in statuses.items() if code != "OK")
    # which calls failed is unknown when some did: the percentiles then include the failed calls,
    # while requests and rps count only the answered ones
    result = meter.apply(loadgen.summarize("grpc-h2load", args.concurrency, args.duration, answered,
                                           errors, dict(statuses)))
    result.requests, result.rps = statuses["OK"], round(statuses["OK"] / args.duration, 1)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result.loadgen_cpu_us_per_req = round(cpu / len(rows) * 1e6, 1) if rows else None
    return result


SERVICE = "inference.GRPCInferenceService"
TRANSPORTS = {"grpc": run_grpc, "grpc-h2load": run_grpc_h2load}
loadgen.TRANSPORTS.update(TRANSPORTS)
# loadgen.py runs as __main__, so `import loadgen` above is a second copy of it: register there too.
_main = sys.modules.get("__main__")
if _main is not None and isinstance(getattr(_main, "TRANSPORTS", None), dict):
    _main.TRANSPORTS.update(TRANSPORTS)
