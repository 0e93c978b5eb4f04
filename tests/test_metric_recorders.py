"""The recorder APIs other engines call (LLM engine, batcher), on a real registry, scraped and
parsed like Prometheus would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inhouse.observability.fast import FastHistogram
from inhouse.observability.metrics import LATENCY_BUCKETS, Metrics


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_llm_recorder_exports_tokens_ttft_itl_kv_and_prefix_hits() -> None:
    m = Metrics()
    llm = m.llm("chat", 2)
    llm.observe_tokens(prompt_tokens=12, completion_tokens=30)
    llm.observe_tokens(prompt_tokens=8, completion_tokens=0)
    llm.observe_time_to_first_token(0.08)
    llm.observe_inter_token_latency(0.03)
    llm.observe_inter_token_latency(0.08, tokens=4)  # four tokens in one step: 20 ms each
    llm.set_kv_cache_usage(0.25)
    llm.observe_prefix_cache(queried_tokens=20, hit_tokens=15)
    s = _samples(m.registry)
    lv = frozenset({("model", "chat"), ("version", "2")})
    assert s[("inhouse_llm_prompt_tokens_total", lv)] == 20
    assert s[("inhouse_llm_completion_tokens_total", lv)] == 30
    assert s[("inhouse_llm_time_to_first_token_seconds_count", lv)] == 1
    assert s[("inhouse_llm_inter_token_latency_seconds_count", lv)] == 5
    assert abs(s[("inhouse_llm_inter_token_latency_seconds_sum", lv)] - 0.11) < 1e-9
    assert s[("inhouse_llm_inter_token_latency_seconds_bucket", lv | {("le", "0.02")})] == 4
    assert s[("inhouse_llm_kv_cache_usage_ratio", lv)] == 0.25
    assert s[("inhouse_llm_prefix_cache_hit_tokens_total", lv)] == 15
    assert s[("inhouse_llm_prefix_cache_queried_tokens_total", lv)] == 20


def test_scheduler_recorder_for_a_batcher() -> None:
    m = Metrics()
    rec = m.scheduler("bert", 1)
    for _ in range(3):
        rec.observe_queue(0.002)
    rec.observe_compute(0.010, batch_size=3)
    s = _samples(m.registry)
    lv = frozenset({("model", "bert"), ("version", "1")})
    assert s[("inhouse_queue_duration_seconds_count", lv)] == 3
    assert s[("inhouse_compute_duration_seconds_count", lv)] == 1
    assert s[("inhouse_batch_size_bucket", lv | {("le", "2.0")})] == 0
    assert s[("inhouse_batch_size_bucket", lv | {("le", "4.0")})] == 1
    assert s[("inhouse_batch_size_sum", lv)] == 3


def test_fast_histogram_matches_prometheus_client() -> None:
    """Same observations, same exposition as prometheus_client's own Histogram (bucket edges
    are inclusive: a value equal to a bound falls in that bucket)."""
    values = [0.0, 0.0001, 0.00010001, 0.0005, 0.001, 0.3, 1.0, 7.5, 120.0, 500.0]
    ours_reg, ref_reg = CollectorRegistry(), CollectorRegistry()
    ours = FastHistogram("h", "doc", ["m"], LATENCY_BUCKETS, registry=ours_reg).labels("x")
    ref = Histogram("h", "doc", ["m"], buckets=LATENCY_BUCKETS, registry=ref_reg).labels("x")
    for v in values:
        ours.observe(v)
        ref.observe(v)

    def without_created(reg: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return {k: v for k, v in _samples(reg).items() if not k[0].endswith("_created")}

    assert without_created(ours_reg) == without_created(ref_reg)


def test_unloaded_versions_are_forgotten() -> None:
    m = Metrics()
    m.infer_done("a", 1, 0.001)
    m.infer_done("a", 2, 0.001)
    m.forget("a", 1)
    names = {(n, dict(ls).get("version")) for (n, ls) in _samples(m.registry)}
    assert ("inhouse_inference_requests_total", "2") in names
    assert ("inhouse_inference_requests_total", "1") not in names
    assert ("model_inference_latency_seconds_count", "1") not in names


def test_models_that_take_an_llm_recorder_get_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from conftest import run_server
    from inhouse.backends import register_backend

    register_backend("test-tokens", "token_backend:TokenCountingBackend")
    mdir = tmp_path / "models" / "counter"
    (mdir / "1").mkdir(parents=True)
    (mdir / "model.yaml").write_text(yaml.safe_dump({"name": "counter", "backend": "test-tokens",
                                                     "warmup": {"samples": 0}}))
    with run_server(tmp_path / "models") as srv, srv.client() as c:
        r = c.post("/v2/models/counter/infer", json={"inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["hello", "abc"]}]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [5, 3]
        text = c.get("/metrics").text
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    lv = frozenset({("model", "counter"), ("version", "1")})
    assert samples[("inhouse_llm_prompt_tokens_total", lv)] == 8
    assert samples[("inhouse_llm_completion_tokens_total", lv)] == 2
    assert samples[("inhouse_llm_time_to_first_token_seconds_count", lv)] == 1
    assert samples[("inhouse_llm_kv_cache_usage_ratio", lv)] == 0.5
