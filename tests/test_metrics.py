"""/metrics after real traffic, parsed with prometheus-client's own parser."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer, run_server
from models import add_model, write_model


def scrape(client: httpx.Client, path: str = "/metrics") -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}"""
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for k, v in samples.get(name, {}).items() if labels.items() <= dict(k).items())


def _add_body(rows: int = 1) -> dict[str, object]:
    a = np.ones((rows, 4), np.float32).ravel().tolist()
    return {"inputs": [{"name": "a", "shape": [rows, 4], "datatype": "FP32", "data": a},
                       {"name": "b", "shape": [rows, 4], "datatype": "FP32", "data": a}]}


def test_counts_and_histograms_move_with_traffic(server: RunningServer) -> None:
    with server.client() as c:
        before = scrape(c)
        for _ in range(5):
            assert c.post("/v2/models/add/infer", json=_add_body()).status_code == 200
        bad = _add_body()
        bad["inputs"][0]["shape"] = [1, 3]  # type: ignore[index]
        assert c.post("/v2/models/add/infer", json=bad).status_code == 400  # 2005
        assert c.post("/v2/models/add/infer", json={"inputs": [
            {"name": "a", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}).status_code == 400  # 2006
        assert c.post("/v2/models/nope/infer", json=_add_body()).status_code == 404  # 1002
        after = scrape(c)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("inhouse_inference_requests_total", model="add", version="1", outcome="success", code="ok") == 5
    assert delta("inhouse_inference_requests_total", model="add", outcome="client_error", code="2005") == 1
    assert delta("inhouse_inference_requests_total", model="add", outcome="client_error", code="2006") == 1
    # a name that is not in the repository does not become a label value
    assert delta("inhouse_inference_requests_total", model="_unknown", code="1002") == 1
    assert not any(dict(k).get("model") == "nope" for k in after["inhouse_inference_requests_total"])
    # total latency covers requests that reached the data plane (not the malformed 2005 body);
    # queue / compute / batch only those that ran
    assert delta("model_inference_latency_seconds_count", model="add") == 6
    assert delta("model_inference_latency_seconds_sum", model="add") > 0
    assert delta("model_inference_latency_seconds_bucket", model="add", le="+Inf") == 6
    assert delta("inhouse_queue_duration_seconds_count", model="add", version="1") == 5
    assert delta("inhouse_compute_duration_seconds_count", model="add", version="1") == 5
    assert delta("inhouse_batch_size_bucket", model="add", le="1.0") == 5
    # buckets are cumulative and fine enough for sub-millisecond models
    buckets = sorted((float(dict(k)["le"]), v) for k, v in after["model_inference_latency_seconds_bucket"].items()
                     if dict(k)["model"] == "add" and dict(k)["version"] == "1")
    assert buckets[0][0] == 0.0001 and buckets[-1][0] == float("inf")
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    # HTTP-level metrics use the route template, never the raw path
    assert delta("inhouse_http_requests_total", route="/v2/models/{model}/infer", status="200") == 5
    assert delta("inhouse_http_requests_total", route="/v2/models/{model}/infer", status="400") == 2


def test_client_chosen_values_do_not_become_labels(server: RunningServer) -> None:
    with server.client() as c:
        for i, method in enumerate(("PROPFIND", "PURGE", "MKCOL")):  # methods the HTTP parser accepts
            c.request(method, "/v2/health/live")
            c.get(f"/random/path/{i}")
            c.post(f"/v2/models/made-up-{i}/infer", json=_add_body())
        s = scrape(c)
    labels = [dict(k) for name in ("inhouse_http_requests_total", "inhouse_inference_requests_total")
              for k in s[name]]
    values = {v for ls in labels for v in ls.values()}
    assert not values & {"PROPFIND", "PURGE", "MKCOL"}
    assert not any(v.startswith("made-up") or "/random/" in v for v in values)
    assert value(s, "inhouse_http_requests_total", method="OTHER") == 3
    assert value(s, "inhouse_http_requests_total", route="unmatched", status="404") == 3
    assert value(s, "inhouse_inference_requests_total", model="_unknown") == 3


def test_state_queue_and_process_gauges(server: RunningServer) -> None:
    with server.client() as c:
        s = scrape(c)
        assert value(s, "inhouse_model_state", model="add", version="1", state="READY") == 1
        assert value(s, "inhouse_model_state", model="add", version="1", state="FAILED") == 0
        assert value(s, "inhouse_models", state="READY") == 4
        assert value(s, "inhouse_queue_depth", model="add", version="1") == 0
        assert value(s, "inhouse_inflight_requests", model="add", version="1") == 0
        assert value(s, "inhouse_queue_capacity", model="add", version="1") > 0
        assert value(s, "process_resident_memory_bytes") > 10_000_000
        assert value(s, "process_cpu_seconds_total") > 0
        assert 0 < value(s, "inhouse_system_memory_available_bytes") <= value(s, "inhouse_system_memory_total_bytes")
        assert value(s, "inhouse_model_load_duration_seconds_count", model="add") == 1
        # OpenMetrics when the scraper asks for it
        r = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert r.text.rstrip().endswith("# EOF")

        assert c.post("/v2/repository/models/add/unload").status_code == 200
        server.call(server.server.manager.settle())
        s = scrape(c)
        assert value(s, "inhouse_model_state", model="add", version="1", state="UNLOADED") == 1
        assert value(s, "inhouse_model_unload_duration_seconds_count", model="add") == 1
        # an unloaded version's per-request series are dropped, not left to linger
        assert value(s, "inhouse_queue_duration_seconds_count", model="add", version="1") == 0
        assert c.post("/v2/models/add/infer", json=_add_body()).status_code == 503
        s = scrape(c)
        assert value(s, "inhouse_inference_requests_total", model="add", outcome="rejected", code="1002") == 1


def test_load_failure_is_counted(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    with run_server(repo) as srv, srv.client() as c:
        s = scrape(c)
        assert value(s, "inhouse_model_state", model="broken", version="1", state="FAILED") == 1
        assert value(s, "inhouse_models", state="FAILED") == 1
        failures = {dict(k)["code"]: v for k, v in s["inhouse_model_load_failures_total"].items()
                    if dict(k)["model"] == "broken"}
        assert sum(failures.values()) == 1 and next(iter(failures)).startswith("100")


def test_dedicated_metrics_port(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    with run_server(repo, metrics_port=0) as srv:
        port = srv.server.metrics_port
        with srv.client() as c:
            assert c.post("/v2/models/add/infer", json=_add_body()).status_code == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as m:
            s = scrape(m)
        assert value(s, "inhouse_inference_requests_total", model="add", outcome="success") == 1


def test_metrics_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    import socket

    import pytest

    from inhouse.server import StartupError

    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"Cannot listen for metrics on 127.0.0.1:{port}.*--metrics-port"), \
                run_server(repo, metrics_port=port):
            pass
