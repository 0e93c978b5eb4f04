"""Admission by the tokens sequences hold (CPU): a long ``max_model_len`` no longer cuts the
number of concurrent sequences to what fits at full length; when running sequences outgrow the
budget the newest is preempted and recomputes, with the same greedy output; and trimmed cache
memory really goes back to the OS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from inhouse.backends.transformers import GenerativeModel  # noqa: E402
from inhouse.core.recorders import NULL_LLM_RECORDER  # noqa: E402
from inhouse.llm.kv_cache import KVCache, bytes_per_token  # noqa: E402
from test_llm_engine import Recorder, load, prompt, run  # noqa: E402

# the tiny llama of llm_fixtures: 2 layers, 2 KV heads of 16, fp32, max_position_embeddings 2048
PER_TOKEN = bytes_per_token(2, 2, 16, torch.float32)
FULL = 2048


@pytest.fixture(scope="module")
def two_full(llm_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerativeModel]:
    """8 sequences of the model's full length asked for, memory for two: slots stay 8."""
    model = load(llm_models["llama"], tmp_path_factory.mktemp("kv"),
                 engine={"max_num_seqs": 8, "max_num_batched_tokens": 256, "kv_cache_bytes": 2 * FULL * PER_TOKEN})
    yield model
    model.close()


@pytest.fixture(scope="module")
def tight(llm_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerativeModel]:
    """Just over one full-length sequence of memory, for 8 slots: long generations must preempt."""
    model = load(llm_models["llama"], tmp_path_factory.mktemp("kv-tight"),
                 engine={"max_num_seqs": 8, "max_num_batched_tokens": 256,
                         "kv_cache_bytes": (FULL + 64) * PER_TOKEN})
    yield model
    model.close()


async def peak_running(model: GenerativeModel, work: Any) -> tuple[int, Any]:
    peak = 0
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, model.engine.load()["running"])
        await asyncio.sleep(0.002)
    return peak, task.result()


async def test_full_length_budget_does_not_cut_concurrency(two_full: GenerativeModel) -> None:
    engine = two_full.engine
    assert engine.max_model_len == FULL and len(engine.cache.slots) == 8  # was min(8, 2) = 2
    assert engine.cache.token_budget == 2 * FULL
    ids = [prompt(two_full, f"question {i} about the weather") for i in range(8)]
    alone = [await run(two_full, p, max_tokens=40, ignore_eos=True) for p in ids[:2]]
    peak, together = await peak_running(
        two_full, asyncio.gather(*(run(two_full, p, max_tokens=40, ignore_eos=True) for p in ids)))
    assert peak == 8
    assert [t[0] for t in together[:2]] == [a[0] for a in alone]
    assert all(len(t[0]) == 40 for t in together)
    assert engine.cache.held <= engine.cache.token_budget


async def test_outgrown_budget_preempts_and_output_is_unchanged(tight: GenerativeModel) -> None:
    engine = tight.engine
    budget = engine.cache.token_budget
    assert budget == FULL + 64
    ids = [prompt(tight, f"long story number {i}") for i in range(8)]
    want = 400  # 8 × (prompt + 400) tokens far exceed the budget once they all decode
    alone = [await run(tight, p, max_tokens=want, ignore_eos=True) for p in ids[:3]]
    before = engine.stats["preempted"]
    rec = Recorder()
    tight.set_llm_recorder(rec)
    try:
        together = await asyncio.gather(*(run(tight, p, max_tokens=want, ignore_eos=True) for p in ids))
    finally:
        engine.recorder = NULL_LLM_RECORDER
    assert engine.stats["preempted"] > before
    assert [t[0] for t in together[:3]] == [a[0] for a in alone]  # recomputed, not changed
    assert all(len(t[0]) == want and t[2].finish_reason == "length" for t in together)
    assert rec.usage and max(rec.usage) <= 1.0  # the memory written never went past the budget
    assert engine.load() == {"running": 0, "waiting": 0}


async def test_one_full_length_sequence_always_runs(tight: GenerativeModel) -> None:
    ids = prompt(tight, "fill the whole context")
    tokens, _, last = await run(tight, ids, max_tokens=FULL - len(ids), ignore_eos=True)
    assert len(tokens) == FULL - len(ids) and last.finish_reason == "length"


def test_trim_gives_memory_back_to_the_os() -> None:
    cache = KVCache(layers=2, slots=4, kv_heads=2, head_dim=64, max_len=65536, dtype=torch.float32,
                    device=torch.device("cpu"), token_budget=65536)
    proc = psutil.Process()
    base = proc.memory_info().rss
    for store in (cache.k, cache.v):
        for t in store:
            t[0, :, :].fill_(1.0)  # slot 0, every position: 2 layers × K,V × 32 MiB
    cache.wrote(0, 65536)
    grown = proc.memory_info().rss - base
    assert grown > 100 << 20 and cache.held == 65536
    cache.trim(0, 1024)
    shrunk = proc.memory_info().rss - base
    assert shrunk < grown * 0.1 and cache.held == 1024
    assert float(cache.k[0][0, 0, 1023, 0]) == 1.0 and float(cache.k[0][0, 0, 5000, 0]) == 0.0
