"""Per-request cost of inhouse's instrumentation (metrics, request context, access log).

    python bench/bench_observability.py [--n 20000]

Every number is measured in this run against a reference taken in the same run:
1. the recorder calls one inference makes (infer_done + observe_queue + observe_compute),
   in µs per request, against the same observations with prometheus_client's own types;
2. DataPlane.infer on a tiny ONNX model in-process, without and with the observer and recorders;
3. the whole ASGI app (REST infer, no network) without and with the observability middleware,
   access log off and on (JSON lines to /dev/null, as the server writes them)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from inhouse.core.dataplane import DataPlane, ServerState
from inhouse.core.manager import ModelManager
from inhouse.core.repository import ModelRepository
from inhouse.core.types import InferRequest, InputTensor
from inhouse.logs import configure_logging
from inhouse.observability.metrics import Metrics
from inhouse.observability.observer import RequestObserver
from inhouse.settings import ServerSettings
from models import add_model, write_model


def bench_recorders(n: int) -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from inhouse.observability.metrics import LATENCY_BUCKETS

    m = Metrics()
    rec = m.scheduler("add", 1)
    obs = RequestObserver(m)
    # reference: the same five observations with prometheus_client's own metric types
    reg = CollectorRegistry()
    ok = Counter("ok", "", ["m"], registry=reg).labels("add")
    q, c, b, lat = (Histogram(name, "", ["m"], buckets=LATENCY_BUCKETS, registry=reg).labels("add")
                    for name in ("q", "c", "b", "lat"))

    def instrumented(k: int) -> None:
        for _ in range(k):
            rec.observe_queue(0.0002)
            rec.observe_compute(0.0003, 1)
            obs.infer_done("add", 1, 0.0006)

    def reference(k: int) -> None:
        for _ in range(k):
            q.observe(0.0002)
            c.observe(0.0003)
            b.observe(1)
            ok.inc()
            lat.observe(0.0006)

    def empty(k: int) -> None:
        for _ in range(k):
            pass

    runs: dict[str, list[float]] = {"inhouse": [], "prometheus_client": [], "empty": []}
    for _ in range(7):
        for label, fn in (("inhouse", instrumented), ("prometheus_client", reference), ("empty", empty)):
            t0 = time.perf_counter()
            fn(n)
            runs[label].append((time.perf_counter() - t0) / n)
    base = min(runs["empty"])
    ours, ref = min(runs["inhouse"]) - base, min(runs["prometheus_client"]) - base
    print(f"recorder calls per request (inhouse):  {ours * 1e6:7.2f} µs")
    print(f"same with prometheus_client types:     {ref * 1e6:7.2f} µs  (inhouse / reference = {ours / ref:.2f})")


async def _dataplane(repo: Path, n: int) -> None:
    a = np.ones((1, 4), np.float32)

    def request() -> InferRequest:
        return InferRequest(model="add", inputs=[InputTensor("a", "FP32", [1, 4], a),
                                                 InputTensor("b", "FP32", [1, 4], a)])

    async def run(dp: DataPlane, k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            await dp.infer(request())
        return (time.perf_counter() - t0) / k

    results: dict[str, list[float]] = {"bare": [], "instrumented": []}
    managers = []
    for label in results:
        mgr = ModelManager(ModelRepository(repo))
        dp = DataPlane(mgr, ServerState(started=True))
        if label == "instrumented":
            metrics = Metrics()
            mgr.recorders = metrics
            dp.observer = RequestObserver(metrics)
        await mgr.load("add")
        managers.append((label, mgr, dp))
    for _ in range(5):  # interleave rounds so load changes hit both equally
        for label, _mgr, dp in managers:
            results[label].append(await run(dp, n))
    for _, mgr, _dp in managers:
        await mgr.close()
    bare, inst = min(results["bare"]), min(results["instrumented"])
    print(f"DataPlane.infer bare:                  {bare * 1e6:7.1f} µs/request")
    print(f"DataPlane.infer instrumented:          {inst * 1e6:7.1f} µs/request  "
          f"(+{(inst - bare) * 1e6:.1f} µs, ratio {inst / bare:.3f})")


async def _asgi(repo: Path, n: int) -> None:
    from inhouse.llm.service import LLMService
    from inhouse.observability.setup import Observability
    from inhouse.security.gate import SecurityGate
    from inhouse.transports.http.app import build_app

    a = np.ones(4, np.float32).tolist()
    body = orjson.dumps({"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": a},
                                    {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": a}]})
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v2/models/add/infer", "raw_path": b"/v2/models/add/infer", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}

    async def call(app: Any) -> None:
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 0

        async def send(msg: dict[str, Any]) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]

        await app(dict(scope), receive, send)
        if status != 200:
            raise RuntimeError(f"status {status}")


    variants = {}
    for label in ("bare", "observability, no access log", "observability + access log"):
        settings = ServerSettings(access_log=label.endswith("+ access log"), gzip_min_bytes=0)
        mgr = ModelManager(ModelRepository(repo))
        dp = DataPlane(mgr, ServerState(started=True))
        observability = None if label == "bare" else Observability(settings, mgr, dp).http
        app = build_app(dp, settings, llm=LLMService(mgr), gate=SecurityGate(settings, mgr),
                        observability=observability)
        await mgr.load("add")
        variants[label] = (app, mgr)
    logging.getLogger("inhouse.access").setLevel(logging.INFO)
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(5):
        for label, (app, _) in variants.items():
            t0 = time.perf_counter()
            for _ in range(n):
                await call(app)
            results[label].append((time.perf_counter() - t0) / n)
    for _, mgr in variants.values():
        await mgr.close()
    bare = min(results["bare"])
    for label, r in results.items():
        t = min(r)
        extra = "" if label == "bare" else f"  (+{(t - bare) * 1e6:.1f} µs, ratio {t / bare:.3f})"
        print(f"ASGI infer, {label + ':':<31}{t * 1e6:7.1f} µs/request{extra}")
    print(f"  (median of rounds, bare: {statistics.median(results['bare']) * 1e6:.1f} µs)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    args = ap.parse_args()
    # logging as `inhouse serve` sets it up (JSON lines on stderr), with stderr sent to /dev/null
    # as a log file would take it: access-log lines take the server's fast lane
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    configure_logging("info", "json")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_model(repo, "add", add_model(), {"warmup": {"samples": 0}})
        bench_recorders(args.n * 5)
        asyncio.run(_dataplane(repo, args.n // 4))
        asyncio.run(_asgi(repo, args.n // 4))


if __name__ == "__main__":
    main()
