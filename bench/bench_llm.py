"""LLM engine speed against plain ``transformers.generate``, measured in the same run.

Model: a random Llama of ~58 M parameters (hidden 512, 8 layers, 8 heads, vocab 32 000), fp32,
on CPU by default. Reports (tokens/s, ratios against the references of this run):
  ref_single    transformers.generate, 1 request (64-token prompt, 128 new tokens, greedy)
  ref_static16  transformers.generate, 16 such requests in one static batch (the limit)
  engine_single our engine, one stream
  engine_16     our engine, 16 streams arriving staggered over the first second: aggregate
                tokens/s, TTFT and inter-token latency p50/p99
  hf_cb16       transformers' own continuous batching (generate_batch), 16 requests
  prefix        TTFT with a shared 8k-token system prompt: the cold first request against one plain
                transformers forward over the prompt, then later ones (a new 24-token turn each)
                against a transformers forward of the turn over a DynamicCache of the prompt
References and engine alternate for --rounds rounds; per-round ratios and their medians count.

Run:  .venv/bin/python bench/bench_llm.py [--rounds 3] [--device cpu|cuda] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from inhouse.backends import LoadContext
from inhouse.backends.transformers import TransformersBackend
from inhouse.core.spec import parse_spec
from inhouse.llm.types import GenerationRequest, SamplingParams

PROMPT, NEW, STREAMS = 64, 128, 16


def build_model(out: Path, *, hidden: int, layers: int, heads: int, vocab: int, max_len: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w0").save_pretrained(str(out))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_len, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", file=sys.stderr)
    model.save_pretrained(str(out))
    return out


def note(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def hf_generate(model: Any, batch: list[list[int]], new: int, device: str) -> float:
    from transformers import GenerationConfig

    ids = torch.tensor(batch, device=device)
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    assert out.shape[1] == len(batch[0]) + new
    return len(batch) * new / dt


def hf_continuous_batching(model: Any, batch: list[list[int]], new: int) -> float | None:
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return None
    cfg = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=0)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=1024)
        t0 = time.perf_counter()  # not under inference_mode: its worker thread updates tensors in place
        out = model.generate_batch(inputs=batch, generation_config=cfg, continuous_batching_config=cb,
                                   progress_bar=False)
        dt = time.perf_counter() - t0
    except Exception as err:  # its API moves between releases; report rather than fail the bench
        print(f"transformers continuous batching unavailable: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    n = sum(len(o.generated_tokens or []) for o in out.values())
    errors = {str(o.error) for o in out.values() if o.error}
    if n < len(batch) * new or errors:
        note(f"transformers continuous batching produced {n} of {len(batch) * new} tokens; errors: {errors}")
    return n / dt if n else None


async def stream(engine: Any, ids: list[int], new: int, delay: float = 0.0) -> dict[str, Any]:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    times: list[float] = []
    n = 0
    req = GenerationRequest(f"b{delay}", ids, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    cached = 0
    async for chunk in engine.generate(req):
        now = time.perf_counter()
        times += [now] * len(chunk.token_ids)
        n += len(chunk.token_ids)
        cached = chunk.cached_tokens
    return {"start": t0, "end": times[-1], "ttft": times[0] - t0, "itl": [b - a for a, b in itertools.pairwise(times)],
            "tokens": n, "cached": cached}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


async def engine_single(engine: Any, vocab: int) -> float:
    r = await stream(engine, prompts(1, PROMPT, 1, vocab)[0], NEW)
    return float(r["tokens"] / (r["end"] - r["start"]))


async def engine_16(engine: Any, vocab: int) -> dict[str, Any]:
    ps = prompts(STREAMS, PROMPT, 2, vocab)
    runs = await asyncio.gather(*(stream(engine, p, NEW, delay=i / STREAMS) for i, p in enumerate(ps)))
    t0, t1 = min(r["start"] for r in runs), max(r["end"] for r in runs)
    ttft = [r["ttft"] for r in runs]
    itl = [x for r in runs for x in r["itl"]]
    return {"tps": sum(r["tokens"] for r in runs) / (t1 - t0), "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99), "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99)}


async def prefix_part(engine: Any, hf: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Cold prefill and prefix reuse of a shared ``system_len``-token system prompt, each against
    plain transformers in the same run: one forward over the whole prompt (cold), and one forward
    over the new 24-token turn on top of a DynamicCache holding the system prompt (reuse)."""
    from transformers import DynamicCache

    system = prompts(1, args.system_len, 3, vocab)[0]
    turns = prompts(5, 24, 4, vocab)
    res: dict[str, Any] = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(torch.tensor([system + turns[0]], device=args.device), logits_to_keep=1)
        res["ref_cold_prefill_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        note(f"transformers forward of the {args.system_len + 24}-token prompt: {res['ref_cold_prefill_ms']:.0f} ms")
        kv = DynamicCache(config=hf.config)
        hf(torch.tensor([system], device=args.device), past_key_values=kv, use_cache=True, logits_to_keep=1)
    out = []
    for i, turn in enumerate(turns):
        r = await stream(engine, system + turn, 8)
        with torch.inference_mode():
            t0 = time.perf_counter()
            hf(torch.tensor([turn], device=args.device), past_key_values=kv, use_cache=True, logits_to_keep=1)
            if args.device == "cuda":
                torch.cuda.synchronize()
            ref = time.perf_counter() - t0
            kv.crop(-len(turn))  # back to the system prompt alone
        out.append({"request": i + 1, "ttft_ms": round(r["ttft"] * 1000, 1), "cached_tokens": r["cached"],
                    "ref_turn_forward_ms": round(ref * 1000, 1)})
        note(f"prefix request {i + 1}: ttft {r['ttft'] * 1000:.0f} ms (cached {r['cached']}); transformers "
             f"forward of the turn over its cache {ref * 1000:.0f} ms")
    res["prefix"] = out
    res["cold_ttft_vs_ref_forward"] = round(out[0]["ttft_ms"] / res["ref_cold_prefill_ms"], 3)
    later = out[1:]
    res["median_prefix_ttft_ms"] = statistics.median(r["ttft_ms"] for r in later)
    res["median_prefix_ttft_vs_ref_turn"] = round(statistics.median(
        r["ttft_ms"] / r["ref_turn_forward_ms"] for r in later), 3)
    return res


async def run_rounds(engine: Any, hf: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Reference and engine alternate, round after round: on a shared, noisy machine the ratio
    within one round (measured seconds apart) is what counts; the median over rounds is reported."""
    await stream(engine, prompts(1, PROMPT, 99, vocab)[0], 8)  # warm
    hf_generate(hf, prompts(1, PROMPT, 98, vocab), 8, args.device)  # warm
    rounds = []
    for r in range(args.rounds):
        row: dict[str, Any] = {"round": r + 1}
        row["ref_static16_tps"] = hf_generate(hf, prompts(STREAMS, PROMPT, 2, vocab), NEW, args.device)
        e16 = await engine_16(engine, vocab)
        row["engine_16_tps"] = e16.pop("tps")
        row.update(e16)
        row["ref_single_tps"] = hf_generate(hf, prompts(1, PROMPT, 1, vocab), NEW, args.device)
        row["engine_single_tps"] = await engine_single(engine, vocab)
        row["ratio_16_vs_static"] = row["engine_16_tps"] / row["ref_static16_tps"]
        row["ratio_single"] = row["engine_single_tps"] / row["ref_single_tps"]
        note(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        rounds.append(row)
    res: dict[str, Any] = {"rounds": rounds}
    for key in ("ratio_16_vs_static", "ratio_single", "ref_static16_tps", "engine_16_tps", "ref_single_tps",
                "engine_single_tps", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        res[f"median_{key}"] = statistics.median(r[key] for r in rounds)
    if not args.no_cb:
        cb = hf_continuous_batching(hf, prompts(STREAMS, PROMPT, 2, vocab), NEW)
        ref = hf_generate(hf, prompts(STREAMS, PROMPT, 2, vocab), NEW, args.device)
        res["hf_cb16_tps"], res["hf_cb16_ref_static16_tps"] = cb, ref
        res["hf_cb16_ratio_vs_static"] = cb / ref if cb else None
        note(f"transformers continuous batching: {cb} tok/s vs static {ref:.1f}")
    if args.system_len:
        res.update(await prefix_part(engine, hf, args, vocab))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="smaller model, for a smoke run")
    ap.add_argument("--large", action="store_true", help="a larger model (hidden 2048, 16 layers), for GPUs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=8192, help="shared system prompt; 0 skips that part")
    ap.add_argument("--no-cb", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--as-shipped", action="store_true",
                    help="the model's own max_model_len of 32768 and default engine settings (model.yaml "
                         "sets nothing): what a user who sets nothing gets")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = dict(hidden=512, layers=8, heads=8, vocab=32000)
    if args.quick:
        size = dict(hidden=128, layers=2, heads=4, vocab=4000)
    if args.large:
        size = dict(hidden=2048, layers=16, heads=16, vocab=32000)
    max_len = 32768 if args.as_shipped else max(args.system_len, PROMPT) + 512
    with tempfile.TemporaryDirectory() as tmp:
        src = build_model(Path(tmp) / "hf", **size, max_len=max_len)
        from transformers import AutoModelForCausalLM

        dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).to(args.device).eval()
        vdir = Path(tmp) / "repo" / "bench" / "1"
        vdir.mkdir(parents=True)
        doc: dict[str, Any] = {"name": "bench", "backend": "transformers", "task": "generate", "source": str(src),
                               "instances": {"device": args.device}}
        if not args.as_shipped:
            doc.update({"max_model_len": max_len, "engine": {"max_num_seqs": STREAMS, "max_num_batched_tokens": 2048}})
        spec = parse_spec(doc, "bench")
        model = TransformersBackend().load(LoadContext(model_dir=vdir.parent, version_dir=vdir, spec=spec))
        try:
            out: dict[str, Any] = {"device": args.device, "model": size, "torch_threads": torch.get_num_threads(),
                                   "max_model_len": model.engine.max_model_len,
                                   "slots": len(model.engine.cache.slots),
                                   "kv_token_budget": getattr(model.engine.cache, "token_budget", None)}
            out.update(asyncio.run(run_rounds(model.engine, hf, args, size["vocab"])))
        finally:
            model.close()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
