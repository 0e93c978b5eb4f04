"""The web console at /console: real headless Chromium against a real server with the demo
repository (without auth on loopback, and with --auth), and its JSON endpoints' guards."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from conftest import RunningServer, run_server, wait_until
from inhouse.demo import ensure_demo_repository
from inhouse.security.keys import KeyStore

SPECIES = {"setosa", "versicolor", "virginica"}
IRIS = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: the console's browser tests need Chromium and playwright (.ci/run installs them).")
        pytest.skip("Chromium or playwright is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_repository(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def open_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The demo models, and one whose artefact is not an ONNX model (it fails to load)."""
    repo = tmp_path_factory.mktemp("repo-open") / "models"
    shutil.copytree(demo_repo, repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "model.yaml").write_text("name: broken\n")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an ONNX model")
    with run_server(repo, data_dir=tmp_path_factory.mktemp("data-open")) as srv:
        yield srv


@pytest.fixture(scope="module")
def secured(demo_repo: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    data = tmp_path_factory.mktemp("data-auth")
    store = KeyStore(data)
    keys = {"admin": store.create("ops", ["admin", "infer", "metrics"])[0],
            "infer": store.create("app", ["infer"])[0],
            "metrics": store.create("prom", ["metrics"])[0]}
    store.close()
    with run_server(demo_repo, auth=True, data_dir=data) as srv:
        yield srv, keys


class Console:
    """One browser tab on the console, with every request URL it made."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1300, "height": 850})
        self.page = self.context.new_page()
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())
        self.page.goto(url + "/console")

    def close(self) -> None:
        self.context.close()

    def row(self, model: str) -> Any:
        return self.page.locator(f'#models-table tr[data-model="{model}"]')


@pytest.fixture
def console(browser: Any, open_server: RunningServer) -> Iterator[Console]:
    c = Console(browser, open_server.url)
    yield c
    assert not c.errors, c.errors
    c.close()


def _sign_in(c: Console, key: str) -> None:
    c.page.wait_for_selector("#login:not([hidden])")
    c.page.fill("#api-key", key)
    c.page.click("#login-form button[type=submit]")


# ---- without auth, on loopback ------------------------------------------------------------------
def test_console_opens_without_auth_and_lists_demo_models(console: Console) -> None:
    page = console.page
    page.wait_for_selector('#models-table tr[data-model="iris"]')
    assert page.is_hidden("#login")
    for model in ("iris", "breast-cancer", "diabetes"):
        row = console.row(model)
        assert row.locator(".state").inner_text() == "READY"
    wait_until(lambda: console.row("iris").locator(".backend").inner_text() != "")
    assert console.row("iris").locator(".backend").inner_text() == "onnxruntime"
    assert console.row("iris").locator(".device").inner_text() == "cpu"
    console.row("iris").locator("button", has_text="model.yaml").click()
    broken = console.row("broken")
    assert broken.locator(".state").inner_text() == "FAILED"
    cells = broken.locator("td").all_inner_texts()
    assert cells[3] and cells[4].isdigit()  # the reason and the error code
    assert broken.locator("button[data-action=load]").count() == 1
    page.wait_for_selector("#model-config:not([hidden])")
    yaml_text = page.inner_text("#model-config-text")
    assert "backend: onnxruntime" in yaml_text and "inputs:" in yaml_text and "labels:" in yaml_text
    page.screenshot(path=str(Path(os.environ.get("CONSOLE_SHOTS", "/tmp")) / "console-models.png"))


def test_console_headers(open_server: RunningServer) -> None:
    with open_server.client() as c:
        for path in ("/console", "/console/static/console.js", "/console/static/console.css",
                     "/console/api/session"):
            r = c.get(path)
            assert r.status_code == 200, path
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "unsafe-inline" not in csp
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/console/static/../server.py").status_code == 404
        assert c.get("/console/static/secret.txt").status_code == 404
        page = c.get("/console").text
        assert "<script>" not in page and "style=" not in page  # nothing inline: the CSP would block it


def test_playground_predicts_iris_species(console: Console) -> None:
    page = console.page
    page.click("button[data-tab=playground]")
    page.wait_for_selector('#pg-model option[value="iris"]', state="attached")
    page.select_option("#pg-model", "iris")
    page.wait_for_selector('#pg-inputs textarea[data-input="features"]')
    page.click("#pg-example")
    page.click("#pg-run")
    page.wait_for_selector("#pg-label")
    assert page.inner_text("#pg-label") in SPECIES
    page.screenshot(path=str(Path(os.environ.get("CONSOLE_SHOTS", "/tmp")) / "console-playground.png"))


def test_metrics_view_updates_after_requests(console: Console, open_server: RunningServer) -> None:
    page = console.page
    page.click("button[data-tab=metrics]")
    card = '#metric-cards [data-metric="Inference requests"] .value'
    page.wait_for_selector(card)
    before = int(page.inner_text(card))
    with open_server.client() as c:
        for _ in range(25):
            assert c.post("/v2/models/iris/infer", json=IRIS).status_code == 200
    wait_until(lambda: int(page.inner_text(card)) >= before + 25, timeout=15)
    wait_until(lambda: "ms" in page.inner_text('[data-metric="p50"] .value'), timeout=15)
    assert page.locator("#chart-rps polyline").count() == 1
    assert page.locator("#chart-latency polyline").count() == 3
    assert page.locator("#chart-batches rect").count() >= 1
    page.screenshot(path=str(Path(os.environ.get("CONSOLE_SHOTS", "/tmp")) / "console-metrics.png"), full_page=True)


def test_unload_then_load_from_console(console: Console) -> None:
    page = console.page
    page.wait_for_selector('#models-table tr[data-model="diabetes"]')
    console.row("diabetes").locator("button[data-action=unload]").click()
    wait_until(lambda: console.row("diabetes").locator(".state").inner_text() == "UNLOADED", timeout=20)
    console.row("diabetes").locator("button[data-action=load]").click()
    wait_until(lambda: console.row("diabetes").locator(".state").inner_text() == "READY", timeout=30)
    console.row("diabetes").locator("button[data-action=reload]").click()
    wait_until(lambda: console.row("diabetes").locator("button[data-action=reload]").is_enabled(), timeout=30)
    assert console.row("diabetes").locator(".state").inner_text() == "READY"


def test_doctor_view_shows_findings(console: Console) -> None:
    page = console.page
    page.click("button[data-tab=doctor]")
    page.wait_for_selector("#doctor-findings li[data-severity]", timeout=30000)
    assert "model iris" in page.inner_text("#doctor-findings")


def test_playground_chat_streams_an_answer_with_token_counts(browser: Any, llm_repo: Path, tmp_path: Path) -> None:
    with run_server(llm_repo, data_dir=tmp_path / "data", load="tiny-llama") as srv:
        c = Console(browser, srv.url)
        page = c.page
        try:
            page.wait_for_selector("#tabs:not([hidden])")
            page.click("button[data-tab=playground]")
            page.fill("#chat-model", "tiny-llama")
            page.fill("#chat-max", "12")
            page.fill("#chat-input", "Hello there")
            page.click("#chat-send")
            wait_until(lambda: "completion" in page.inner_text("#chat-stats"), timeout=60)
            stats = page.inner_text("#chat-stats")
            assert "prompt" in stats and "tokens/s" in stats
            assert page.locator("#chat-log .msg.user").inner_text().endswith("Hello there")
            assert page.locator("#chat-log .msg.assistant").count() == 1
            assert not c.errors, c.errors
        finally:
            c.close()


# ---- with --auth ----------------------------------------------------------------------------------
def test_console_asks_for_a_key_and_refuses_a_wrong_one(browser: Any,
                                                       secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, _ = secured
    c = Console(browser, srv.url)
    try:
        c.page.wait_for_selector("#login:not([hidden])")
        assert c.page.is_hidden("#tabs")
        _sign_in(c, "ih_not_a_real_key")
        c.page.wait_for_selector("#login-error:not([hidden])")
        assert "refused" in c.page.inner_text("#login-error")
        assert c.page.is_hidden("#tabs")
    finally:
        c.close()


def test_infer_key_sees_no_keys_tab_and_is_refused_by_the_keys_api(
        browser: Any, secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, keys = secured
    c = Console(browser, srv.url)
    try:
        _sign_in(c, keys["infer"])
        c.page.wait_for_selector("#view-playground:not([hidden])")
        tabs = c.page.locator("#tabs button").all_inner_texts()
        assert tabs == ["Playground"]
        c.page.wait_for_selector('#pg-model option[value="iris"]', state="attached")
        c.page.select_option("#pg-model", "iris")
        c.page.wait_for_selector('#pg-inputs textarea[data-input="features"]')
        c.page.click("#pg-example")
        c.page.click("#pg-run")
        c.page.wait_for_selector("#pg-label")
        assert c.page.inner_text("#pg-label") in SPECIES
        _no_key_in_urls(c, keys)
        assert c.context.cookies() == []
    finally:
        c.close()
    with srv.client() as http:
        r = http.get("/v2/security/keys", headers={"authorization": f"Bearer {keys['infer']}"})
        assert r.status_code == 403


def test_admin_key_creates_a_key_shown_once_and_revokes_it(
        browser: Any, secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, keys = secured
    c = Console(browser, srv.url)
    page = c.page
    try:
        _sign_in(c, keys["admin"])
        page.wait_for_selector("#view-models:not([hidden])")
        assert page.locator("#tabs button").all_inner_texts() == [
            "Models", "Metrics", "Playground", "Keys", "Audit", "Doctor"]
        page.click("button[data-tab=keys]")
        page.wait_for_selector('#keys-table tr[data-name="ops"]')
        page.fill("#key-name", "console-made")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-created:not([hidden])")
        made = page.inner_text("#key-secret")
        assert made
        page.wait_for_selector('#keys-table tr[data-name="console-made"]')
        assert made not in page.inner_text("#keys-table")
        page.screenshot(path=str(Path(os.environ.get("CONSOLE_SHOTS", "/tmp")) / "console-keys.png"), full_page=True)
        page.click("#key-dismiss")
        assert page.inner_text("#key-secret") == ""
        with srv.client() as http:  # the new key works, with the scope it was given
            assert http.post("/v2/models/iris/infer", json=IRIS,
                             headers={"authorization": f"Bearer {made}"}).status_code == 200
        page.locator('#keys-table tr[data-name="console-made"] button[data-action=revoke]').click()
        wait_until(lambda: page.locator('#keys-table tr[data-name="console-made"] .status').inner_text() == "revoked")
        with srv.client() as http:
            assert http.post("/v2/models/iris/infer", json=IRIS,
                             headers={"authorization": f"Bearer {made}"}).status_code == 401
        # the audit view lists what just happened and verifies the chain
        page.click("button[data-tab=audit]")
        page.fill("#audit-action", "keys.revoke")
        page.click("#audit-form button[type=submit]")
        page.wait_for_selector("#audit-table tbody tr")
        page.click("#audit-verify")
        page.wait_for_selector("#audit-verify-status .ok-text")
        page.screenshot(path=str(Path(os.environ.get("CONSOLE_SHOTS", "/tmp")) / "console-audit.png"), full_page=True)
        with page.expect_download() as dl:
            page.click("#audit-export")
        lines = Path(dl.value.path()).read_bytes().splitlines()
        assert lines and all(orjson.loads(line)["action"] == "keys.revoke" for line in lines)
        _no_key_in_urls(c, {**keys, "made": made})
    finally:
        c.close()


def test_a_key_revoked_mid_session_signs_the_console_out(
        browser: Any, secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, keys = secured
    with srv.client(headers={"authorization": f"Bearer {keys['admin']}"}) as http:
        made = http.post("/v2/security/keys", json={"name": "short-lived", "scopes": ["infer"]}).json()
    c = Console(browser, srv.url)
    try:
        _sign_in(c, made["key"])
        c.page.wait_for_selector('#pg-model option[value="iris"]', state="attached")
        with srv.client(headers={"authorization": f"Bearer {keys['admin']}"}) as http:
            assert http.delete(f"/v2/security/keys/{made['key_id']}").status_code == 200
        c.page.select_option("#pg-model", "iris")
        c.page.wait_for_selector("#login:not([hidden])")
        assert "revoked" in c.page.inner_text("#login-error")
        c.page.reload()  # the key is gone from the tab's storage, and the notice was shown once
        c.page.wait_for_selector("#login:not([hidden])")
        assert c.page.is_hidden("#login-error") and c.page.is_hidden("#tabs")
    finally:
        c.close()


def _no_key_in_urls(c: Console, keys: dict[str, str]) -> None:
    assert c.urls
    for url in c.urls:
        for key in keys.values():
            assert key not in url
            assert key.split("_", 2)[2] not in url  # the secret (ih_<id>_<secret>), which may hold '_' itself


# ---- the console's JSON endpoints: each one's scope enforced -------------------------------------
def test_console_endpoints_enforce_their_scopes(secured: tuple[RunningServer, dict[str, str]]) -> None:
    srv, keys = secured

    def get(path: str, key: str | None) -> httpx.Response:
        with srv.client() as http:
            return http.get(path, headers={"authorization": f"Bearer {key}"} if key else {})

    assert get("/console", None).status_code == 200  # the page itself holds no data
    assert get("/console/static/console.js", None).status_code == 200
    refused = get("/console/api/session", None)
    assert refused.status_code == 401
    assert refused.headers["x-frame-options"] == "DENY" and "default-src 'self'" in refused.headers[
        "content-security-policy"]
    assert get("/console/api/session", "ih_wrong").status_code == 401
    session = get("/console/api/session", keys["infer"]).json()
    assert session["auth"] is True and session["scopes"] == ["infer"] and session["key"]["name"] == "app"
    expected = {"/console/api/metrics": "metrics", "/console/api/audit": "admin",
                "/console/api/audit/verify": "admin", "/console/api/audit/export": "admin",
                "/console/api/doctor": "admin"}
    for path, scope in expected.items():
        assert get(path, None).status_code == 401, path
        for name, key in keys.items():
            has = scope in {"admin": ["admin", "infer", "metrics"], "infer": ["infer"], "metrics": ["metrics"]}[name]
            assert get(path, key).status_code == (200 if has else 403), (path, name)
    snap = get("/console/api/metrics", keys["metrics"]).json()
    assert {"time", "http", "inference", "latency", "batch_size", "queue_depth", "process"} <= set(snap)
    verify = get("/console/api/audit/verify", keys["admin"]).json()
    assert verify["ok"] is True and verify["entries"] > 0
    rows = get("/console/api/audit?result=error&action=console.audit", keys["admin"]).json()["entries"]
    assert rows and all(r["status"] in (401, 403) and r["action"] == "console.audit" for r in rows)
    assert get("/console/api/audit?result=maybe", keys["admin"]).status_code == 400
    later = time.time() + 3600
    assert get(f"/console/api/audit?since={later}", keys["admin"]).json()["entries"] == []
    assert get(f"/console/api/audit?until={later}&action=console.audit", keys["admin"]).json()["matched"] > 0
    assert get(f"/console/api/audit/export?since={later}", keys["admin"]).content == b""
    assert get("/console/api/audit?since=yesterday", keys["admin"]).status_code == 400


def test_metrics_snapshot_counts_requests(open_server: RunningServer) -> None:
    with open_server.client() as c:
        before = c.get("/console/api/metrics").json()
        for _ in range(5):
            c.post("/v2/models/iris/infer", json=IRIS)
        c.post("/v2/models/iris/infer", json={"inputs": []})
        after = c.get("/console/api/metrics").json()
    assert after["inference"]["requests"] - before["inference"]["requests"] >= 5
    assert after["latency"]["count"] - before["latency"]["count"] >= 5
    assert after["latency"]["buckets"][-1][0] is None  # +Inf
    assert after["http"]["requests"] > before["http"]["requests"]
    assert after["process"]["resident_memory_bytes"] > 0
    with open_server.client() as c:  # the console's own polling is not traffic
        first = c.get("/console/api/metrics").json()["http"]["requests"]
        for _ in range(3):
            c.get("/console/api/metrics")
        assert c.get("/console/api/metrics").json()["http"]["requests"] == first
    # without --auth the audit log is off: the console says so instead of failing
    with open_server.client() as c:
        assert c.get("/console/api/audit").status_code == 404
        assert c.get("/console/api/session").json()["audit"] is False


def test_serve_logs_the_console_url(demo_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="inhouse.server"), \
            run_server(demo_repo, data_dir=tmp_path / "data", load="iris") as srv:
        urls = [getattr(r, "url", None) for r in caplog.records if r.getMessage() == "console"]
    assert urls == [srv.url + "/console"]


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}])
def test_every_tab_fits_the_viewport(browser: Any, open_server: RunningServer, viewport: dict[str, int]) -> None:
    """At 1280×800 and on a phone-sized screen no tab is wider than the screen: the tabs and wide
    tables scroll inside their own boxes, so every control stays reachable."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.goto(open_server.url + "/console")
    page.wait_for_selector('#models-table tr[data-model="iris"]')
    tabs = page.locator("nav button:visible")
    assert tabs.count() >= 4
    too_wide = []
    for i in range(tabs.count()):
        tab = tabs.nth(i)
        tab.scroll_into_view_if_needed()
        tab.click()
        page.wait_for_timeout(300)
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > viewport["width"] + 1:
            too_wide.append((tab.inner_text(), width))
        page.screenshot(path=str(Path(os.environ.get("CONSOLE_SHOTS", "/tmp"))
                                 / f"console-{viewport['width']}-{tab.inner_text().lower()}.png"))
    context.close()
    assert too_wide == []
