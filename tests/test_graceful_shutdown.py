"""SIGTERM to a real ``inhouse serve`` process under load: it stops accepting, the requests
already in flight complete, and it exits cleanly."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from inhouse.client import ClientError, InhouseClient
from models import sleep_model, write_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_finishes_in_flight_requests(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "slow", sleep_model())
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--http-port", str(port), "--grpc-port", "0",
         "--data-dir", str(tmp_path / "data"), "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "INHOUSE_DRAIN_TIMEOUT_S": "60"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready")
        rows, one = 1024, 0.0
        while True:  # requests long enough that SIGTERM surely arrives while they are in flight
            x = np.random.default_rng(0).standard_normal((rows, 512)).astype(np.float32)
            with InhouseClient(url) as c:
                t0 = time.perf_counter()
                c.infer("slow", {"x": x})
                one = time.perf_counter() - t0
            if one >= 0.5 or rows >= 32768:
                break
            rows *= 2
        results: list[object] = []

        def call() -> None:
            try:
                with InhouseClient(url, timeout=120, retries=0) as c:
                    out, _ = c.infer("slow", {"x": x})
                    results.append(out["y"].shape)
            except ClientError as err:
                results.append(err)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        # SIGTERM once every request has reached the server and some are still in it (one running, others
        # queued). On a loaded machine the first may finish before the last is read: those count as reached.
        deadline = time.time() + 60
        while time.time() < deadline:
            m = re.search(r'^inhouse_inflight_requests\{model="slow"[^}]*\} (\S+)$',
                          httpx.get(f"{url}/metrics", timeout=5).text, re.M)
            inflight = float(m.group(1)) if m else 0.0
            if inflight >= 1 and inflight + len(results) >= 4:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the four requests never reached the server: {results}")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(180)
        assert results == [(rows, 512)] * 4, results
        assert proc.wait(60) == 0
        try:
            httpx.get(f"{url}/v2/health/live", timeout=2)
            raise AssertionError("the server still accepts connections after stopping")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
