"""The engine's forward step against a plain Transformers forward: chunked prefill (a chunk
attends to the cached positions before it and, causally, to itself) gives the same logits as
one pass over the whole prompt, for grouped-query (Llama, 4 heads / 2 KV heads) models."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from inhouse.llm.kv_cache import KVCache  # noqa: E402
from inhouse.llm.runner import DecoderRunner, StepRow  # noqa: E402


@pytest.mark.parametrize("chunk", [7, 64, 300])
def test_chunked_prefill_matches_one_forward(llm_models: dict[str, Path], chunk: int) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llm_models["llama"]), dtype=torch.float32).eval()
    cfg = hf.config
    cache = KVCache(layers=cfg.num_hidden_layers, slots=3, kv_heads=cfg.num_key_value_heads,
                    head_dim=cfg.hidden_size // cfg.num_attention_heads, max_len=512, dtype=torch.float32,
                    device=torch.device("cpu"))
    runner = DecoderRunner(hf, cache)
    g = torch.Generator().manual_seed(chunk)
    ids = torch.randint(3, cfg.vocab_size, (301,), generator=g).tolist()
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0].float()
    for slot in (0, 2):  # a slot other than 0 reads its own keys
        got = []
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            got.append(runner.forward([StepRow(slot, start, part, True)])[0])
        ends = [min(s + chunk, len(ids)) - 1 for s in range(0, len(ids), chunk)]
        torch.testing.assert_close(torch.stack(got), want[ends], rtol=1e-4, atol=1e-4)
    # the last token decoded after the chunked prompt, in a batch with another slot's decode
    with torch.inference_mode():
        nxt = int(want[-1].argmax())
        ref = hf(torch.tensor([[*ids, nxt]])).logits[0, -1].float()
    out = runner.forward([StepRow(0, len(ids), [nxt], True), StepRow(2, len(ids), [nxt], True)])
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], ref, rtol=1e-4, atol=1e-4)
