"""Alerts reach someone: the shipped Prometheus rules, evaluated by a real Prometheus, go through the
shipped Alertmanager config to a webhook and, through deploy/monitoring/alertmanager/robot_relay.py,
to WeCom and DingTalk group robots (local fakes on loopback standing in for qyapi / oapi).

Prometheus, Alertmanager, amtool and promtool come from Debian's ``prometheus`` and
``prometheus-alertmanager`` packages (.ci/run installs them). Under CI=true a missing binary fails
the test; elsewhere it skips. The relay's own tests need only Python.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
AM_CONFIG = MONITORING / "alertmanager" / "alertmanager.yml"
RELAY = MONITORING / "alertmanager" / "robot_relay.py"
PROM_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
RULES = MONITORING / "prometheus" / "alerts.yml"

WECOM_KEY = "test-wecom-key-0000"
DING_TOKEN = "test-dingtalk-token"
DING_SECRET = "SECtest-dingtalk-secret"

# a scrape target whose metrics make the shipped InhouseModelFailed rule fire
TARGET_METRICS = (
    "# TYPE inhouse_model_state gauge\n"
    'inhouse_model_state{model="iris",version="1",state="READY"} 0\n'
    'inhouse_model_state{model="iris",version="1",state="FAILED"} 1\n'
)


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    reason = f"{' / '.join(names)} not found: apt-get install prometheus prometheus-alertmanager (see .ci/run)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}. CI=true installs them, so this must not skip.")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Received:
    path: str  # with the query string
    body: Any

    @property
    def route(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()}


@dataclass
class FakeHTTP:
    """A loopback HTTP server that records POSTed JSON and answers from a script (then ``{"errcode": 0}``)."""

    get_body: str = ""
    script: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def posts(self, route: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.route == route]

    def _answer(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self.script.pop(0) if self.script else (200, {"errcode": 0, "errmsg": "ok"})

    def _record(self, path: str, raw: bytes) -> None:
        with self._lock:
            self.received.append(Received(path, json.loads(raw)))


@contextmanager
def serve(fake: FakeHTTP) -> Iterator[FakeHTTP]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(200, fake.get_body.encode(), "text/plain; version=0.0.4")

        def do_POST(self) -> None:
            fake._record(self.path, self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            status, answer = fake._answer()
            self._send(status, json.dumps(answer).encode(), "application/json")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def process(args: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{args[0]} exited with {proc.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(ready_url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(ready, 30, f"{args[0]} at {ready_url}")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def relay(robots: FakeHTTP, log: Path, *, secret: str | None = DING_SECRET) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "WECOM_ROBOT_KEY": WECOM_KEY,
        "WECOM_ROBOT_URL": f"{robots.url}/cgi-bin/webhook/send",
        "DINGTALK_ROBOT_TOKEN": DING_TOKEN,
        "DINGTALK_ROBOT_URL": f"{robots.url}/robot/send",
    }
    env.pop("DINGTALK_ROBOT_SECRET", None)
    if secret:
        env["DINGTALK_ROBOT_SECRET"] = secret
    args = [sys.executable, str(RELAY), "--listen", f"127.0.0.1:{port}",
            "--attempts", "3", "--backoff", "0.05", "--timeout", "2"]
    url = f"http://127.0.0.1:{port}"
    with process(args, log, f"{url}/healthz", env):
        yield url


def _notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    return {"version": "4", "status": "firing", "receiver": "inhouse-oncall", "groupKey": "{}:{}",
            "commonLabels": {}, "externalURL": "http://am.example:9093", "alerts": list(alerts)}


def _alert(name: str, **annotations: str) -> dict[str, Any]:
    return {"status": "firing", "labels": {"alertname": name, "severity": "warning", "instance": "box:8000"},
            "annotations": annotations, "startsAt": "2026-12-06T21:00:00Z"}


def _expected_sign(timestamp: str, secret: str) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


# --- the shipped files -------------------------------------------------------------------------


def test_amtool_accepts_the_shipped_alertmanager_config() -> None:
    amtool = _binary("amtool")
    run = subprocess.run([amtool, "check-config", str(AM_CONFIG)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    doc = yaml.safe_load(AM_CONFIG.read_text())
    urls = [c["url"] for r in doc["receivers"] for c in r.get("webhook_configs", [])]
    assert {"http://robot-relay:9099/wecom", "http://robot-relay:9099/dingtalk"} <= set(urls)
    # keys live in the relay's environment, never in the config
    assert "qyapi.weixin.qq.com" not in AM_CONFIG.read_text() and "access_token" not in AM_CONFIG.read_text()


def test_promtool_accepts_the_shipped_rules_and_prometheus_sends_to_alertmanager() -> None:
    promtool = _binary("promtool")
    run = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "monitoring.yml").read_text())
    assert {"alertmanager", "robot-relay"} <= set(compose["services"])
    for svc in ("alertmanager", "robot-relay"):
        for vol in compose["services"][svc]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / "deploy" / "compose" / src).resolve().exists(), f"{svc} mounts missing {src}"


# --- end to end: Prometheus -> Alertmanager -> webhook + relay -> robots ----------------------


def _alertmanager_config(webhook: str, relay_url: str) -> dict[str, Any]:
    """The shipped config, pointed at the local receivers and with short waits."""
    doc: dict[str, Any] = yaml.safe_load(AM_CONFIG.read_text())
    doc["route"].update(group_wait="1s", group_interval="1m", repeat_interval="1h")
    for receiver in doc["receivers"]:
        for conf in receiver.get("webhook_configs", []):
            url: str = conf["url"]
            if url.startswith("http://robot-relay:9099/"):
                conf["url"] = relay_url + url.removeprefix("http://robot-relay:9099")
            elif url == "http://host.docker.internal:5001/alerts":
                conf["url"] = webhook
            else:
                raise AssertionError(f"update the test for the shipped webhook URL {url}")
    return doc


def _prometheus_config(target: str, alertmanager: str, rules: Path, key_file: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(PROM_CONFIG.read_text())
    doc["global"].update(scrape_interval="1s", evaluation_interval="1s")
    doc["rule_files"] = [str(rules)]
    doc["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    doc["scrape_configs"][0]["authorization"]["credentials_file"] = str(key_file)  # the shipped key file, here
    doc["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    return doc


def _shipped_rules_without_for() -> dict[str, Any]:
    """The shipped rules as they are, but firing at once instead of after ``for`` (1m and more)."""
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    return doc


@dataclass
class Stack:
    webhook: FakeHTTP
    robots: FakeHTTP
    relay_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    alertmanager_bin = _binary("prometheus-alertmanager", "alertmanager")
    prometheus_bin = _binary("prometheus")
    tmp = tmp_path_factory.mktemp("alerting")
    with (
        serve(FakeHTTP()) as webhook,
        serve(FakeHTTP()) as robots,
        serve(FakeHTTP(get_body=TARGET_METRICS)) as target,
        relay(robots, tmp / "relay.log") as relay_url,
    ):
        am_port = _free_port()
        am_yml = tmp / "alertmanager.yml"
        am_yml.write_text(yaml.safe_dump(_alertmanager_config(f"{webhook.url}/alerts", relay_url)))
        am_args = [alertmanager_bin, f"--config.file={am_yml}", f"--storage.path={tmp / 'am-data'}",
                   f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="]
        rules = tmp / "alerts.yml"
        rules.write_text(yaml.safe_dump(_shipped_rules_without_for()))
        prom_port = _free_port()
        prom_yml = tmp / "prometheus.yml"
        key_file = tmp / "inhouse-metrics.key"
        key_file.write_text("test-metrics-key\n")
        prom_yml.write_text(yaml.safe_dump(_prometheus_config(
            target.url.removeprefix("http://"), f"127.0.0.1:{am_port}", rules, key_file)))
        prom_args = [prometheus_bin, f"--config.file={prom_yml}", f"--storage.tsdb.path={tmp / 'prom-data'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}"]
        with (
            process(am_args, tmp / "alertmanager.log", f"http://127.0.0.1:{am_port}/-/ready"),
            process(prom_args, tmp / "prometheus.log", f"http://127.0.0.1:{prom_port}/-/ready"),
        ):
            _wait_until(lambda: webhook.posts("/alerts") and len(robots.received) >= 2, 90,
                        "the InhouseModelFailed notification at the webhook and both robots")
            yield Stack(webhook, robots, tmp / "relay.log")


def test_a_firing_rule_reaches_the_webhook(stack: Stack) -> None:
    payload = stack.webhook.posts("/alerts")[0].body
    assert payload["receiver"] == "inhouse-oncall" and payload["status"] == "firing"
    (alert,) = [a for a in payload["alerts"] if a["labels"]["alertname"] == "InhouseModelFailed"]
    assert alert["labels"]["model"] == "iris" and alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "Model iris (version 1) is FAILED"


def test_the_relay_delivers_wecom_markdown(stack: Stack) -> None:
    (sent,) = stack.robots.posts("/cgi-bin/webhook/send")
    assert sent.query == {"key": WECOM_KEY}
    assert set(sent.body) == {"msgtype", "markdown"} and sent.body["msgtype"] == "markdown"
    assert set(sent.body["markdown"]) == {"content"}
    content: str = sent.body["markdown"]["content"]
    assert "[FIRING:1] InhouseModelFailed" in content
    assert "Model iris (version 1) is FAILED" in content
    assert '<font color="warning">FIRING</font>' in content
    assert len(content.encode()) <= 4096


def test_the_relay_delivers_signed_dingtalk_markdown(stack: Stack) -> None:
    (sent,) = stack.robots.posts("/robot/send")
    query = sent.query
    assert set(query) == {"access_token", "timestamp", "sign"} and query["access_token"] == DING_TOKEN
    assert abs(int(query["timestamp"]) - time.time() * 1000) < 120_000
    assert hmac.compare_digest(query["sign"], _expected_sign(query["timestamp"], DING_SECRET))
    assert sent.body["msgtype"] == "markdown" and set(sent.body["markdown"]) == {"title", "text"}
    assert sent.body["markdown"]["title"] == "[FIRING:1] InhouseModelFailed"
    assert "Model iris (version 1) is FAILED" in sent.body["markdown"]["text"]
    assert "<font" not in sent.body["markdown"]["text"]
    assert WECOM_KEY not in stack.relay_log.read_text() and DING_SECRET not in stack.relay_log.read_text()


# --- the relay on its own ------------------------------------------------------------------------


@pytest.fixture
def robots() -> Iterator[FakeHTTP]:
    with serve(FakeHTTP()) as fake:
        yield fake


def test_a_refusing_robot_is_retried_a_bounded_number_of_times_and_logged(robots: FakeHTTP, tmp_path: Path) -> None:
    robots.script = [(200, {"errcode": 93000, "errmsg": "invalid webhook url"})] * 5
    with relay(robots, tmp_path / "relay.log") as url:
        answer = httpx.post(f"{url}/wecom", json=_notification(_alert("InhouseDown")), timeout=10)
    assert answer.status_code == 502, answer.text
    assert len(robots.posts("/cgi-bin/webhook/send")) == 3
    log = (tmp_path / "relay.log").read_text()
    assert "errcode 93000" in log and "attempt 3 of 3" in log
    assert WECOM_KEY not in log


def test_a_robot_that_recovers_gets_the_message(robots: FakeHTTP, tmp_path: Path) -> None:
    robots.script = [(200, {"errcode": 45009, "errmsg": "api freq out of limit"}), (503, {})]
    with relay(robots, tmp_path / "relay.log", secret=None) as url:
        answer = httpx.post(f"{url}/dingtalk", json=_notification(_alert("InhouseDown")), timeout=10)
    assert answer.status_code == 200, answer.text
    sent = robots.posts("/robot/send")
    assert len(sent) == 3
    assert sent[-1].query == {"access_token": DING_TOKEN}  # no secret: not signed
    log = (tmp_path / "relay.log").read_text()
    assert "errcode 45009" in log and "HTTP 503" in log


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"alerts": []}', b'{"alerts": [{"status": "firing"}]}',
                                  b'{"alerts": [{"labels": {}, "status": "pending"}]}'])
def test_a_malformed_notification_is_rejected(robots: FakeHTTP, tmp_path: Path, body: bytes) -> None:
    with relay(robots, tmp_path / "relay.log") as url:
        answer = httpx.post(f"{url}/wecom", content=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert httpx.post(f"{url}/nowhere", json=_notification(_alert("X")), timeout=10).status_code == 404
    assert answer.status_code == 400, answer.text
    assert robots.received == []


def test_a_long_notification_fits_the_robots_limits(robots: FakeHTTP, tmp_path: Path) -> None:
    alerts = [_alert(f"InhouseHighP99Latency{i}", summary="延迟过高 " * 40, description="x" * 300) for i in range(30)]
    with relay(robots, tmp_path / "relay.log") as url:
        for path in ("wecom", "dingtalk"):
            assert httpx.post(f"{url}/{path}", json=_notification(*alerts), timeout=10).status_code == 200
    (wecom,) = robots.posts("/cgi-bin/webhook/send")
    (ding,) = robots.posts("/robot/send")
    assert len(wecom.body["markdown"]["content"].encode()) <= 4096
    assert wecom.body["markdown"]["content"].endswith("(truncated)")
    assert len(ding.body["markdown"]["text"].encode()) <= 20000


def test_a_resolved_notification_says_so(robots: FakeHTTP, tmp_path: Path) -> None:
    resolved = {**_alert("InhouseDown", summary="box:8000 is not answering scrapes"),
                "status": "resolved", "endsAt": "2026-12-06T21:05:00Z"}
    with relay(robots, tmp_path / "relay.log") as url:
        assert httpx.post(f"{url}/wecom", json={**_notification(resolved), "status": "resolved"},
                          timeout=10).status_code == 200
    (sent,) = robots.posts("/cgi-bin/webhook/send")
    content = sent.body["markdown"]["content"]
    assert "[RESOLVED] InhouseDown" in content and '<font color="info">RESOLVED</font>' in content
    assert "resolved at 2026-12-06T21:05:00Z" in content
