"""End-to-end LLM serving speed through the OpenAI API (HTTP + SSE, the official ``openai``
client), against plain ``transformers.generate`` measured in the same run on the same model.

The server runs as a separate process (``inhouse serve``), as users run it; the model is the
random ~58 M-parameter Llama of ``bench_llm.py`` (hidden 512, 8 layers, 8 heads, vocab 32 000),
fp32 on CPU. Reports:
  ref-single / ref-static16   transformers.generate: 1 request, and 16 in one static batch
                              (64-token prompt, 128 new tokens, greedy) — the reference limit
  api-single                  one chat stream through the API, tokens/s
  api-16                      16 chat streams arriving staggered over the first second:
                              aggregate tokens/s, TTFT and inter-token latency p50/p99
  prefix                      TTFT of chat requests sharing an 8k-token system prompt with a
                              short new user turn (the first is cold; later ones hit the cache)

Run:  .venv/bin/python bench/bench_openai_api.py [--quick] [--system-len 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from bench_llm import NEW, PROMPT, STREAMS, build_model, hf_generate, pct, prompts

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


_WORDS: list[str] = []  # words the tokenizer encodes as exactly one token each


def load_words(source: Path, vocab: int) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source))
    candidates = [f"w{i}" for i in range(3, vocab)]
    enc = tok(candidates, add_special_tokens=False)["input_ids"]
    _WORDS[:] = [w for w, e in zip(candidates, enc, strict=True) if len(e) == 1]


def words(ids: list[int]) -> str:
    """Text of exactly len(ids) tokens (the chat template adds a separator per message)."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(repo: Path, data: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-c", "from inhouse.cli import main; main()", "serve", "--repo", str(repo),
           "--http-port", str(port), "--grpc-port", str(free_port()), "--data-dir", str(data), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v2/models/bench/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError("server did not become ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def chat_stream(client: openai.AsyncOpenAI, messages: list[dict[str, str]], new: int,
                      delay: float = 0.0) -> dict[str, Any]:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    times: list[float] = []
    usage: Any = None
    stream = await client.chat.completions.create(
        model="bench", messages=messages, max_tokens=new, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"start": t0, "end": end, "ttft": times[0] - t0, "itl": [b - a for a, b in itertools.pairwise(times)],
            "tokens": usage.completion_tokens, "cached": usage.prompt_tokens_details.cached_tokens,
            "prompt": usage.prompt_tokens}


async def bench_api(url: str, vocab: int, system_len: int) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=600))
    res: dict[str, Any] = {}
    try:
        await chat_stream(client, [{"role": "user", "content": words(prompts(1, PROMPT, 99, vocab)[0])}], 8)
        single = await chat_stream(client, [{"role": "user", "content": words(prompts(1, PROMPT, 1, vocab)[0])}],
                                   NEW)
        res["api_single_tps"] = single["tokens"] / (single["end"] - single["start"])
        res["prompt_tokens"] = single["prompt"]
        ps = prompts(STREAMS, PROMPT, 2, vocab)
        runs = await asyncio.gather(*(chat_stream(client, [{"role": "user", "content": words(p)}], NEW,
                                                  delay=i / STREAMS) for i, p in enumerate(ps)))
        t0, t1 = min(r["start"] for r in runs), max(r["end"] for r in runs)
        res["api_16_tps"] = sum(r["tokens"] for r in runs) / (t1 - t0)
        ttft = [r["ttft"] for r in runs]
        itl = [x for r in runs for x in r["itl"]]
        res.update(ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), itl_p50_ms=pct(itl, 50),
                   itl_p99_ms=pct(itl, 99))
        system = words(prompts(1, system_len, 3, vocab)[0])
        prefix = []
        for i, turn in enumerate(prompts(5, 24, 4, vocab)):
            r = await chat_stream(client, [{"role": "system", "content": system},
                                           {"role": "user", "content": words(turn)}], 8)
            prefix.append({"request": i + 1, "ttft_ms": round(r["ttft"] * 1000, 1), "cached_tokens": r["cached"],
                           "prompt_tokens": r["prompt"]})
        res["prefix"] = prefix
    finally:
        await client.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller model, for a smoke run")
    ap.add_argument("--system-len", type=int, default=8192)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = dict(hidden=512, layers=8, heads=8, vocab=32000)
    if args.quick:
        size = dict(hidden=128, layers=2, heads=4, vocab=4000)
    max_len = args.system_len + 512
    out: dict[str, Any] = {"device": "cpu", "model": size}
    with tempfile.TemporaryDirectory() as tmp:
        src = build_model(Path(tmp) / "hf", **size, max_len=max_len)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        hf_generate(hf, prompts(1, PROMPT, 98, size["vocab"]), 8, "cpu")  # warm
        out["ref_single_tps"] = hf_generate(hf, prompts(1, PROMPT, 1, size["vocab"]), NEW, "cpu")
        out["ref_static16_tps"] = hf_generate(hf, prompts(STREAMS, PROMPT, 2, size["vocab"]), NEW, "cpu")
        del hf
        load_words(src, size["vocab"])
        repo = Path(tmp) / "repo"
        (repo / "bench" / "1").mkdir(parents=True)
        spec = {"name": "bench", "backend": "transformers", "task": "chat", "source": str(src),
                "max_model_len": max_len, "chat_template": TEMPLATE,
                "engine": {"max_num_seqs": STREAMS, "max_num_batched_tokens": 2048}}
        (repo / "bench" / "model.yaml").write_text(yaml.safe_dump(spec))
        with serve(repo, Path(tmp) / "data") as url:
            out.update(asyncio.run(bench_api(url, size["vocab"], args.system_len)))
    out["ratio_single_vs_generate"] = out["api_single_tps"] / out["ref_single_tps"]
    out["ratio_16_vs_static_batch"] = out["api_16_tps"] / out["ref_static16_tps"]
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
