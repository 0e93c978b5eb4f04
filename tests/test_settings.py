"""Settings: CLI flags > INHOUSE_* environment > inhouse.yaml > defaults, read once."""

from __future__ import annotations

from pathlib import Path

import pytest

from inhouse.settings import ServerSettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INHOUSE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray ./inhouse.yaml


def test_precedence_flags_env_file_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("http_port: 7001\ngrpc_port: 7002\nhost: 0.0.0.0\nmax_request_bytes: 100000\n"
                   "grpc: {max_workers: 3, keepalive_time_s: 5}\n")
    monkeypatch.setenv("INHOUSE_HTTP_PORT", "7101")
    monkeypatch.setenv("INHOUSE_GRPC_PORT", "7102")
    monkeypatch.setenv("INHOUSE_GRPC__MAX_WORKERS", "4")
    s = load_settings(cfg, http_port=7201, poll=None)
    assert s.http_port == 7201                    # flag beats environment and file
    assert s.grpc_port == 7102                    # environment beats file
    assert s.host == "0.0.0.0" and s.max_request_bytes == 100000  # file beats defaults
    assert s.grpc.max_workers == 4 and s.grpc.keepalive_time_s == 5  # nested keys merge
    assert s.poll is False and s.gzip_min_bytes == ServerSettings().gzip_min_bytes  # defaults
    assert s.load_names() == "all"


def test_config_discovery(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "inhouse.yaml").write_text("http_port: 7301\n")
    assert load_settings().http_port == 7301      # ./inhouse.yaml is read when present
    other = tmp_path / "other.yaml"
    other.write_text("http_port: 7302\n")
    monkeypatch.setenv("INHOUSE_CONFIG", str(other))
    assert load_settings().http_port == 7302      # INHOUSE_CONFIG points elsewhere
    assert load_settings(tmp_path / "inhouse.yaml").http_port == 7301  # --config wins


def test_load_names() -> None:
    assert load_settings(load="none").load_names() == "none"
    assert load_settings(load=" a, b ,").load_names() == ["a", "b"]


@pytest.mark.parametrize(("yaml_text", "env", "fragments"), [
    ("http_prot: 8000\n", {}, ["http_prot", "unknown setting"]),
    ("http_port: 99999\n", {}, ["http_port", "65535"]),
    ("grpc: {max_wokers: 2}\n", {}, ["grpc.max_wokers", "unknown setting"]),
    ("", {"INHOUSE_HTTP_PORT": "eighty"}, ["http_port", "integer"]),
    ("", {"INHOUSE_LOG_LEVEL": "loud"}, ["log_level"]),
    ("http_port: [1\n", {}, ["not valid YAML at line 2"]),
    ("- just\n- a list\n", {}, ["must be a mapping"]),
])
def test_bad_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, yaml_text: str, env: dict[str, str],
                      fragments: list[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as info:
        load_settings(cfg)
    for f in fragments:
        assert f in str(info.value), str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
