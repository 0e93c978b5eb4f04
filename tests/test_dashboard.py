"""Every query in the shipped Grafana dashboard and Prometheus alert rules names a metric the
server really exports (scraped from a real server after real traffic)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer
from inhouse.observability.collectors import GpuCollector

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "monitoring" / "grafana" / "dashboards" / "inhouse.json"
ALERTS = DEPLOY / "monitoring" / "prometheus" / "alerts.yml"
PROMETHEUS_OWN = {"up"}  # synthesised by Prometheus per scrape target
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan", "le"}


def metric_names(expr: str) -> set[str]:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    e = re.sub(r"\$\w+", "", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exported_sample_names(text: str) -> set[str]:
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names.update(fam.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(fam.name)
    return names


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, str) and q.startswith("label_values("):
            exprs.append(q[len("label_values("):].rsplit(",", 1)[0])
    return exprs


def alert_queries() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_name_extraction() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le, model) (rate(x_bucket{a="b"}[5m]))) > 1') == {"x_bucket"}
    assert metric_names("a / b > 0.8") == {"a", "b"}


def test_every_query_names_an_exported_metric(server: RunningServer) -> None:
    a = np.ones(4, np.float32).tolist()
    with server.client() as c:
        for _ in range(3):
            c.post("/v2/models/add/infer", json={"inputs": [
                {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": a},
                {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": a}]})
        exported = exported_sample_names(c.get("/metrics").text)
    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 30
    used = set().union(*(metric_names(q) for q in queries))
    # GPU metrics appear only where a GPU is: without one they are the only names allowed to be
    # absent, and test_gpu_collector_exports_what_it_describes checks the collector really emits them
    gpu = {fam.name for fam in GpuCollector().describe()}
    assert gpu <= used, f"the dashboard / alerts show no panel for GPU metrics {sorted(gpu - used)}"
    absent_here = set() if GpuCollector().gpus else gpu
    assert not exported & absent_here, "GPU metrics exported although this machine has no GPU"
    missing = sorted(used - exported - PROMETHEUS_OWN - absent_here)
    assert not missing, f"dashboard / alerts use metrics the server does not export: {missing}"
    # the panels the issue asks for are there
    for needed in ("model_inference_latency_seconds_bucket", "inhouse_inference_requests_total", "inhouse_queue_depth",
                   "inhouse_batch_size_bucket", "inhouse_llm_completion_tokens_total",
                   "inhouse_llm_time_to_first_token_seconds_bucket", "process_resident_memory_bytes",
                   "gpu_memory_usage_bytes", "grpc_server_handled_total"):
        assert needed in used


class _Nvml:
    """Stands in for the NVIDIA driver (``pynvml``) with two GPUs, so the collector's own
    ``collect`` runs on a machine without one (method names are pynvml's)."""

    class _Memory:
        used, total = 3 << 30, 16 << 30

    class _Rates:
        gpu = 40

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"Test GPU"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Memory:
        return self._Memory()

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Rates:
        return self._Rates()


def test_gpu_collector_exports_what_it_describes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names the dashboard test allows to be absent without a GPU are the ones the collector
    really exports when there is one."""
    monkeypatch.setitem(sys.modules, "pynvml", _Nvml())
    collector = GpuCollector()
    assert collector.gpus == 2
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    families = {fam.name: fam for fam in text_string_to_metric_families(text)}
    assert set(families) == {fam.name for fam in collector.describe()}
    assert all(f.type == "gauge" and len(f.samples) == 2 for f in families.values())
    assert families["gpu_memory_usage_bytes"].samples[1].labels == {"gpu": "1", "name": "Test GPU"}
    assert families["gpu_utilization_ratio"].samples[0].value == 0.4


def test_alert_rules_cover_the_failure_modes() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    names = {r["alert"] for g in doc["groups"] for r in g["rules"]}
    assert {"InhouseHighErrorRate", "InhouseHighP99Latency", "InhouseQueueSaturation", "InhouseModelFailed",
            "InhouseMemoryPressure"} <= names
    for g in doc["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]


def test_compose_file_wires_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "monitoring.yml").read_text())
    base = DEPLOY / "compose"
    for svc in ("prometheus", "grafana"):
        for vol in compose["services"][svc]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (base / src).resolve().exists(), f"{svc} mounts missing {src}"
    prom = yaml.safe_load((DEPLOY / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert prom["scrape_configs"][0]["metrics_path"] == "/metrics"
