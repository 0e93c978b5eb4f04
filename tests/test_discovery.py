"""LAN discovery between two processes on loopback: ``inhouse serve --advertise`` announces
``_inhouse._tcp`` and ``inhouse discover`` (another process) lists it with its URL, TLS and
whether a key is needed, and never the key; when the server stops it is no longer listed.

Both bind mDNS to 127.0.0.1 (``discovery_interfaces`` / ``--interface``): the container's ``lo``
has no MULTICAST flag, but multicast sent with IP_MULTICAST_IF 127.0.0.1 is looped back by the
kernel, so the test stays on this machine and needs no LAN."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from inhouse.security.keys import KeyStore
from redis_fixture import free_port

if os.environ.get("CI", "").lower() != "true":
    pytest.importorskip("zeroconf")  # the test extra installs it; under CI its absence fails


def _discover(env: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    out = subprocess.run([sys.executable, "-m", "inhouse", "discover", "--timeout", "1.5", "--json",
                          "--interface", "127.0.0.1"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stdout


def test_advertise_and_discover_on_loopback(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    data = tmp_path / "data"
    store = KeyStore(data)
    key = store.create("app", ["infer"])[0]
    store.close()
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "INHOUSE_DISCOVERY_INTERFACES": '["127.0.0.1"]'}
    server = subprocess.Popen(
        [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--data-dir", str(data), "--auth",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--load", "none", "--advertise"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{http_port}"
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < end, "server did not become ready"
            time.sleep(0.1)
        found, raw = _discover(env)
        mine = [a for a in found if a["port"] == http_port]
        assert len(mine) == 1, found
        advert = mine[0]
        assert advert["url"] == url and advert["tls"] is False and advert["auth"] is True
        assert advert["grpc"] == str(grpc_port) and "127.0.0.1" in advert["addresses"]
        assert key not in raw and key.split("_")[-1] not in raw  # never the key, nor its secret part
        # the URL it gives works with a key, and asks for one without
        assert httpx.get(f"{advert['url']}/v2", timeout=5).status_code == 401
        assert httpx.get(f"{advert['url']}/v2", headers={"authorization": f"Bearer {key}"},
                         timeout=5).status_code == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    assert server.returncode == 0, server.stderr.read() if server.stderr else ""
    found, _ = _discover(env)
    assert [a for a in found if a["port"] == http_port] == []  # it said goodbye on the way out
