"""The deployment guides' ``service.yaml`` as the settings file: ``server: {host, http_port,
grpc_port}`` and ``grpc: {...}`` configure a real ``inhouse serve``; flags and INHOUSE_* win;
keys it does not know are refused by name."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from inhouse.settings import SettingsError, load_settings
from models import add_model
from test_model_path import INHOUSE, _env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_service_yaml_ports_serve(tmp_path: Path) -> None:
    http_port, grpc_port = _free_port(), _free_port()
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port},
                                      "grpc": {"max_workers": 4, "max_concurrent_rpcs": 64}}))
    model = tmp_path / "adder.onnx"
    model.write_bytes(add_model())
    proc = subprocess.Popen([*INHOUSE, "serve", "--config", str(config), "--data-dir", str(tmp_path / "data")],
                            env=_env(tmp_path, model), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert proc.poll() is None
        assert httpx.get(f"{url}/v2/models/adder/ready", timeout=10).status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"Traceback" not in stderr, stderr


def test_flags_and_environment_win_over_the_server_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "service.yaml"
    config.write_text("server: {http_port: 9000, grpc_port: 9001}\n")
    monkeypatch.setenv("INHOUSE_GRPC_PORT", "9500")
    s = load_settings(config, http_port=9100)
    assert (s.http_port, s.grpc_port, s.host) == (9100, 9500, "127.0.0.1")


@pytest.mark.parametrize(("text", "fragment"), [
    ("server: {http_prot: 1}\n", "server.http_prot is not a setting"),
    ("server: 8000\n", "server must be a mapping"),
    ("server: {http_port: 99999}\n", "http_port"),
    ("model_pool: {init_size: 1}\n", "model_pool: unknown setting"),
])
def test_bad_service_yaml_is_refused_by_name(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "service.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=fragment):
        load_settings(config)
