"""The dedicated metrics port follows the main port's rules: the metrics-scope key under auth,
the server's allow-list, TLS; and the shipped Prometheus config can scrape a server with auth."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import yaml

from certs import make_pki
from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore
from test_metrics import scrape

ROOT = Path(__file__).resolve().parent.parent


def _metrics_url(srv: RunningServer, scheme: str = "http") -> str:
    assert srv.server.metrics_port is not None
    return f"{scheme}://localhost:{srv.server.metrics_port}"


def test_metrics_port_needs_a_metrics_key_under_auth(repo: Path) -> None:
    data = repo.parent / "data"
    store = KeyStore(data)
    metrics_key = store.create("prom", ["metrics"])[0]
    infer_key = store.create("app", ["infer"])[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add", metrics_port=0) as srv, \
            httpx.Client(base_url=_metrics_url(srv)) as m:
        r = m.get("/metrics")
        assert r.status_code == 401 and r.headers["inhouse-error-code"] == "4001"
        assert "inhouse_" not in r.text
        r = m.get("/metrics", headers={"authorization": f"Bearer {infer_key}"})
        assert r.status_code == 403 and r.headers["inhouse-error-code"] == "4003"
        assert m.get("/metrics", headers={"authorization": "Bearer ih_0123456789abcdef_wrong"}).status_code == 401
        assert m.get("/elsewhere").status_code == 401  # nothing else is served, and it is not revealed
        m.headers["authorization"] = f"Bearer {metrics_key}"
        assert "inhouse_models" in scrape(m)


def test_metrics_port_keeps_the_allow_list(repo: Path) -> None:
    with run_server(repo, allow_ips=["10.0.0.0/8"], load="add", metrics_port=0) as srv, \
            httpx.Client(base_url=_metrics_url(srv)) as m:
        r = m.get("/metrics")
        assert r.status_code == 403 and r.headers["inhouse-error-code"] == "4003"
        assert m.get("/metrics", headers={"x-forwarded-for": "10.1.2.3"}).status_code == 403  # no trusted proxy


def test_metrics_port_speaks_tls(repo: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key, load="add", metrics_port=0) as srv:
        with httpx.Client(base_url=_metrics_url(srv), timeout=5) as plain, \
                pytest.raises(httpx.TransportError):
            plain.get("/metrics")
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        with httpx.Client(base_url=_metrics_url(srv, "https"), verify=ctx) as m:
            assert "inhouse_models" in scrape(m)


def test_metrics_port_asks_for_the_client_certificate_under_mutual_tls(repo: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert,
                    load="add", metrics_port=0) as srv:
        ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
        with httpx.Client(base_url=_metrics_url(srv, "https"), verify=ctx, timeout=5) as m, \
                pytest.raises(httpx.TransportError):
            m.get("/metrics")
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
        with httpx.Client(base_url=_metrics_url(srv, "https"), verify=ctx) as m:
            assert "inhouse_models" in scrape(m)


def test_shipped_prometheus_config_scrapes_with_a_credentials_file() -> None:
    config = yaml.safe_load((ROOT / "deploy/monitoring/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["inhouse"]
    assert job["metrics_path"] == "/metrics"
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and auth["credentials_file"].startswith("/")
    text = (ROOT / "deploy/monitoring/prometheus/prometheus.yml").read_text()
    assert "inhouse keys create" in text and "--scopes metrics" in text
