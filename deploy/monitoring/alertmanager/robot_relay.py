#!/usr/bin/env python3
"""Relay Alertmanager webhook notifications to WeCom (企业微信) and DingTalk (钉钉) group robots.

Alertmanager's ``webhook_configs`` post Alertmanager's own JSON, which the group robots reject;
this relay turns each notification into the robot's markdown message:

    POST /wecom     -> POST {WECOM_ROBOT_URL}?key={WECOM_ROBOT_KEY}
                       {"msgtype": "markdown", "markdown": {"content": ...}}
    POST /dingtalk  -> POST {DINGTALK_ROBOT_URL}?access_token={DINGTALK_ROBOT_TOKEN}[&timestamp=&sign=]
                       {"msgtype": "markdown", "markdown": {"title": ..., "text": ...}}
    GET  /healthz   -> 200

Keys come from the environment (or ``NAME_FILE``, a file holding the value, for Docker / Kubernetes
secrets), never from this repository. With ``DINGTALK_ROBOT_SECRET`` (the robot's "加签" secret,
``SEC...``) each DingTalk request is signed: HMAC-SHA256 over ``"{timestamp}\\n{secret}"``.

A robot that answers ``errcode`` != 0, an HTTP error or no answer is retried ``--attempts`` times
in all, with a growing pause; then the relay answers 502 so that Alertmanager retries later and
counts the failure (``alertmanager_notifications_failed_total``). A payload that is not an
Alertmanager notification gets 400. Standard library only: runs on any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("robot_relay")

WECOM_URL = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"
DINGTALK_URL = "https://oapi.dingtalk.com/robot/send"
# the robots' documented limits on a markdown message (UTF-8 bytes)
WECOM_MAX_BYTES = 4096
DINGTALK_MAX_BYTES = 20000
MAX_BODY_BYTES = 1 << 20


class PayloadError(ValueError):
    """The request body is not an Alertmanager webhook notification."""


class DeliveryError(RuntimeError):
    """The robot did not accept the message after every attempt."""


@dataclass(frozen=True)
class Robot:
    name: str
    url: str  # base URL; the credentials are added as query parameters
    params: Mapping[str, str]
    secret: str | None = None  # DingTalk "加签"

    def request_url(self, now_ms: int) -> str:
        params = dict(self.params)
        if self.secret:
            params["timestamp"] = str(now_ms)
            params["sign"] = dingtalk_sign(self.secret, now_ms)
        return f"{self.url}?{urllib.parse.urlencode(params)}"


@dataclass(frozen=True)
class RelaySettings:
    robots: Mapping[str, Robot]  # by path: "wecom", "dingtalk"
    attempts: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 5.0


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """DingTalk's signature: base64(HMAC-SHA256(key=secret, "{timestamp}\\n{secret}")), unquoted.

    ``urlencode`` quotes it once when it goes into the query string.
    """
    digest = hmac.new(secret.encode(), f"{timestamp_ms}\n{secret}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def parse_notification(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise PayloadError(f"The body is not JSON ({err}).") from err
    if not isinstance(doc, dict):
        raise PayloadError("The body must be a JSON object (Alertmanager's webhook payload).")
    alerts = doc.get("alerts")
    if not isinstance(alerts, list) or not alerts:
        raise PayloadError("The payload has no 'alerts' list: is this Alertmanager's webhook_config?")
    for alert in alerts:
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise PayloadError("Every alert must be an object with a 'labels' object.")
        if alert.get("status") not in ("firing", "resolved"):
            raise PayloadError("Every alert needs 'status' 'firing' or 'resolved'.")
        if not isinstance(alert.get("annotations", {}), dict):
            raise PayloadError("An alert's 'annotations' must be an object.")
    return doc


def _title(doc: Mapping[str, Any]) -> str:
    alerts = doc["alerts"]
    firing = sum(1 for a in alerts if a["status"] == "firing")
    status = f"FIRING:{firing}" if firing else "RESOLVED"
    common = doc.get("commonLabels")
    if not isinstance(common, dict):
        common = {}
    name = common.get("alertname") or alerts[0]["labels"].get("alertname", "alert")
    return f"[{status}] {name}"


def render_markdown(doc: Mapping[str, Any], *, wecom: bool) -> str:
    """One markdown text for a notification: a heading, then each alert's summary and labels."""

    def colour(text: str, status: str) -> str:
        # WeCom's markdown has three font colours; DingTalk's has none
        if not wecom:
            return text
        return f'<font color="{"warning" if status == "firing" else "info"}">{text}</font>'

    lines = [f"### inhouse alert {_title(doc)}"]
    for alert in doc["alerts"]:
        labels: dict[str, Any] = alert["labels"]
        notes: dict[str, Any] = alert.get("annotations") or {}
        status = alert["status"]
        head = notes.get("summary") or labels.get("alertname", "alert")
        severity = labels.get("severity", "")
        lines.append("")
        lines.append(f"**{colour(status.upper(), status)}** {severity} {head}".replace("  ", " "))
        if notes.get("description"):
            lines.append(f"> {notes['description']}")
        shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity"))
        if shown:
            lines.append(f"> {shown}")
        since = alert.get("startsAt") if status == "firing" else alert.get("endsAt")
        if since:
            lines.append(f"> {'since' if status == 'firing' else 'resolved at'} {since}")
        if alert.get("generatorURL"):
            lines.append(f"> [source]({alert['generatorURL']})")
    if doc.get("externalURL"):
        lines.append("")
        lines.append(f"[Alertmanager]({doc['externalURL']})")
    return "\n".join(lines)


def truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode()
    if len(raw) <= limit:
        return text
    marker = "\n…(truncated)"
    return raw[: limit - len(marker.encode())].decode(errors="ignore") + marker


def robot_message(robot: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    if robot == "wecom":
        content = truncate_utf8(render_markdown(doc, wecom=True), WECOM_MAX_BYTES)
        return {"msgtype": "markdown", "markdown": {"content": content}}
    text = truncate_utf8(render_markdown(doc, wecom=False), DINGTALK_MAX_BYTES)
    return {"msgtype": "markdown", "markdown": {"title": _title(doc), "text": text}}


def _post_once(robot: Robot, message: Mapping[str, Any], timeout_s: float) -> None:
    request = urllib.request.Request(  # noqa: S310 (robot URLs are checked to be http(s))
        robot.request_url(int(time.time() * 1000)),
        data=json.dumps(message, ensure_ascii=False).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        raise DeliveryError(f"HTTP {err.code}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise DeliveryError(f"no answer ({err})") from err
    except ValueError as err:
        raise DeliveryError("the answer is not JSON") from err
    code = answer.get("errcode", 0) if isinstance(answer, dict) else None
    if code != 0:
        errmsg = answer.get("errmsg", "") if isinstance(answer, dict) else answer
        raise DeliveryError(f"errcode {code}: {errmsg}")


def deliver(
    robot: Robot, message: Mapping[str, Any], settings: RelaySettings,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Post ``message`` to ``robot``, retrying a bounded number of times; return the attempts used."""
    for attempt in range(1, settings.attempts + 1):
        try:
            _post_once(robot, message, settings.timeout_s)
            return attempt
        except DeliveryError as err:
            log.warning("%s robot (%s) refused the message, attempt %d of %d: %s",
                        robot.name, robot.url, attempt, settings.attempts, err)
            if attempt == settings.attempts:
                raise DeliveryError(f"{robot.name} robot refused the message {attempt} times: {err}") from err
            sleep(settings.backoff_s * attempt)
    raise AssertionError("unreachable")  # attempts >= 1 is checked when the settings are read


class RelayHandler(BaseHTTPRequestHandler):
    server_version = "inhouse-robot-relay"
    settings: RelaySettings  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _answer(self, status: HTTPStatus, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/healthz":
            self._answer(HTTPStatus.OK, "ok")
        else:
            self._answer(HTTPStatus.NOT_FOUND, "GET /healthz, or POST /wecom or /dingtalk.")

    def do_POST(self) -> None:
        name = self.path.split("?")[0].strip("/")
        if name not in ("wecom", "dingtalk"):
            self._answer(HTTPStatus.NOT_FOUND, "POST /wecom or /dingtalk.")
            return
        robot = self.settings.robots.get(name)
        if robot is None:
            env = "WECOM_ROBOT_KEY" if name == "wecom" else "DINGTALK_ROBOT_TOKEN"
            log.error("An alert for the %s robot arrived but %s is not set: it was not delivered.", name, env)
            self._answer(HTTPStatus.SERVICE_UNAVAILABLE, f"Set {env} (or {env}_FILE) for the relay.")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._answer(HTTPStatus.BAD_REQUEST, f"Content-Length must be 0..{MAX_BODY_BYTES}.")
            return
        try:
            doc = parse_notification(self.rfile.read(length))
        except PayloadError as err:
            log.warning("Rejected a malformed notification for %s: %s", name, err)
            self._answer(HTTPStatus.BAD_REQUEST, str(err))
            return
        try:
            attempts = deliver(robot, robot_message(name, doc), self.settings)
        except DeliveryError as err:
            log.error("%s", err)
            self._answer(HTTPStatus.BAD_GATEWAY, str(err))
            return
        log.info("Delivered %s (%d alerts) to the %s robot in %d attempt(s).",
                 _title(doc), len(doc["alerts"]), name, attempts)
        self._answer(HTTPStatus.OK, "delivered")


def _secret(env: Mapping[str, str], name: str) -> str | None:
    if env.get(name):
        return env[name].strip()
    path = env.get(f"{name}_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return None


def _base_url(env: Mapping[str, str], name: str, default: str) -> str:
    url = env.get(name) or default
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise SystemExit(f"{name} must be an http(s) URL, not {url!r}.")
    return url


def settings_from_env(env: Mapping[str, str], attempts: int, backoff_s: float, timeout_s: float) -> RelaySettings:
    if attempts < 1:
        raise SystemExit("--attempts must be at least 1.")
    robots: dict[str, Robot] = {}
    key = _secret(env, "WECOM_ROBOT_KEY")
    if key:
        robots["wecom"] = Robot("wecom", _base_url(env, "WECOM_ROBOT_URL", WECOM_URL), {"key": key})
    token = _secret(env, "DINGTALK_ROBOT_TOKEN")
    if token:
        robots["dingtalk"] = Robot("dingtalk", _base_url(env, "DINGTALK_ROBOT_URL", DINGTALK_URL),
                                   {"access_token": token}, _secret(env, "DINGTALK_ROBOT_SECRET"))
    return RelaySettings(robots, attempts, backoff_s, timeout_s)


def make_server(host: str, port: int, settings: RelaySettings) -> ThreadingHTTPServer:
    handler = type("BoundRelayHandler", (RelayHandler,), {"settings": settings})
    return ThreadingHTTPServer((host, port), handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", default="127.0.0.1:9099", help="host:port (default 127.0.0.1:9099)")
    parser.add_argument("--attempts", type=int, default=3, help="tries per message, in all (default 3)")
    parser.add_argument("--backoff", type=float, default=1.0, help="seconds; the n-th retry waits n times this")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a robot's answer")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from_env(os.environ, args.attempts, args.backoff, args.timeout)
    host, _, port = args.listen.rpartition(":")
    server = make_server(host or "127.0.0.1", int(port), settings)
    for name in ("wecom", "dingtalk"):
        robot = settings.robots.get(name)
        if robot is None:
            log.warning("The %s robot is not configured: POST /%s answers 503.", name, name)
        else:
            signed = " (signed)" if robot.secret else ""
            log.info("POST /%s relays to %s%s.", name, robot.url, signed)
    log.info("Listening on %s:%d.", *server.server_address[:2])
    # as a container's PID 1 the default SIGTERM disposition is to ignore it: stop on it explicitly
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
