"""The KV cache's memory on CPU: reserved at full length, committed only where written."""

from __future__ import annotations

import psutil
import pytest

torch = pytest.importorskip("torch")

from inhouse.llm.kv_cache import KVCache  # noqa: E402


def test_cpu_cache_commits_memory_only_where_written() -> None:
    proc = psutil.Process()
    before = proc.memory_info().rss
    # 2 layers x K/V x 16 slots x 8 heads x 8192 positions x 64 x 4 bytes = 1 GiB reserved
    cache = KVCache(layers=2, slots=16, kv_heads=8, head_dim=64, max_len=8192, dtype=torch.float32,
                    device=torch.device("cpu"))
    assert cache.capacity == 8192 and cache.k[0].shape == (16, 8, 8192, 64)
    cache.ensure_capacity(8192)  # nothing to grow: no copy
    assert proc.memory_info().rss - before < 64 << 20
    assert float(cache.k[1][15, :, 8000:].abs().sum()) == 0.0 and float(cache.v[0][3].abs().sum()) == 0.0
    cache.k[0][0, :, :4096] = 1.0  # one slot's first half of one layer: 8 MiB
    grown = proc.memory_info().rss - before
    assert 8 << 20 <= grown < 80 << 20
    assert float(cache.k[0][0, :, :4096].mean()) == 1.0 and float(cache.k[0][1].abs().sum()) == 0.0


def test_bfloat16_cpu_cache_starts_at_zero() -> None:
    cache = KVCache(layers=1, slots=2, kv_heads=2, head_dim=8, max_len=32, dtype=torch.bfloat16,
                    device=torch.device("cpu"))
    assert cache.k[0].dtype == torch.bfloat16 and float(cache.k[0].float().abs().sum()) == 0.0
    cache.v[0][1, :, 3] = 2.5
    assert float(cache.v[0].float().sum()) == 2.5 * 2 * 8
