"""The continuous-batching engine on tiny random Llama / Qwen2 models: exactness against plain
``transformers.generate``, batching invariance, prefix caching, cancellation, deadlines, stop
strings, sampling parameters, constraints and context limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from inhouse.backends import LoadContext  # noqa: E402
from inhouse.backends.transformers import GenerativeModel, TransformersBackend  # noqa: E402
from inhouse.core.spec import parse_spec  # noqa: E402
from inhouse.errors import InvalidRequestError, ModelFormatError, ModelSpecError, QueueFullError  # noqa: E402
from inhouse.llm.types import GenerationChunk, GenerationRequest, SamplingParams  # noqa: E402


def load(source: Path, tmp: Path, progress: Any = None, **spec: Any) -> Any:
    doc = {"name": "m", "backend": "transformers", "task": "chat", "source": str(source), **spec}
    vdir = tmp / "m" / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    ctx = LoadContext(model_dir=vdir.parent, version_dir=vdir, spec=parse_spec(doc, "test"), progress=progress)
    return TransformersBackend().load(ctx)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request: pytest.FixtureRequest, llm_models: dict[str, Path],
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerativeModel]:
    model = load(llm_models[request.param], tmp_path_factory.mktemp("lm"), max_model_len=512,
                 engine={"max_num_seqs": 8, "max_num_batched_tokens": 128})
    yield model
    model.close()


@pytest.fixture(scope="module")
def llama(llm_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerativeModel]:
    model = load(llm_models["llama"], tmp_path_factory.mktemp("llama"), max_model_len=512,
                 engine={"max_num_seqs": 4, "max_num_batched_tokens": 64})
    yield model
    model.close()


def prompt(model: GenerativeModel, text: str) -> list[int]:
    return model.engine.apply_chat_template([{"role": "user", "content": text}])


async def run(model: GenerativeModel, ids: list[int], **sampling: Any) -> tuple[list[int], str, GenerationChunk]:
    sampling.setdefault("temperature", 0)
    req = GenerationRequest(f"r{time.monotonic_ns()}", ids, SamplingParams(**sampling))
    tokens: list[int] = []
    text = ""
    last = None
    async for chunk in model.engine.generate(req):
        tokens += chunk.token_ids
        text += chunk.text
        last = chunk
    assert last is not None and last.finish_reason is not None
    return tokens, text, last


def hf_greedy(model: GenerativeModel, ids: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    hf = model._model
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    out = hf.generate(torch.tensor([ids]), generation_config=cfg,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


async def test_greedy_matches_transformers_generate(lm: GenerativeModel) -> None:
    ids = prompt(lm, "What is the weather in Paris today?")
    reference = hf_greedy(lm, ids, 24)  # stops after the model's EOS, like the engine
    tokens, _, last = await run(lm, ids, max_tokens=24)
    assert tokens == reference and len(tokens) > 8
    assert last.completion_tokens == len(tokens) and last.prompt_tokens == len(ids)
    assert last.finish_reason == ("stop" if len(tokens) < 24 else "length")
    tokens, _, last = await run(lm, ids, max_tokens=24, ignore_eos=True)
    assert tokens[: len(reference)] == reference
    assert last.finish_reason == "length" and last.completion_tokens == 24


async def test_greedy_under_continuous_batching_equals_alone(lm: GenerativeModel) -> None:
    texts = [f"request number {i}: tell me about the city of London and its weather" * (1 + i % 3) for i in range(12)]
    prompts = [prompt(lm, t) for t in texts]
    alone = [await run(lm, p, max_tokens=20, ignore_eos=True) for p in prompts[:3]]

    async def later(i: int) -> Any:
        await asyncio.sleep(0.01 * i)  # staggered: they join a batch that is already decoding
        return await run(lm, prompts[i], max_tokens=20, ignore_eos=True)

    together = await asyncio.gather(*(later(i) for i in range(len(prompts))))
    for a, b in zip(alone, together[:3], strict=False):
        assert a[0] == b[0] and a[1] == b[1]
    assert all(len(t[0]) == 20 for t in together)


async def test_sixteen_concurrent_streams_all_finish(llama: GenerativeModel) -> None:
    ids = [prompt(llama, f"stream {i} says hello") for i in range(16)]
    results = await asyncio.gather(*(run(llama, p, max_tokens=12, ignore_eos=True) for p in ids))
    assert [len(r[0]) for r in results] == [12] * 16
    assert all(r[2].finish_reason == "length" for r in results)
    assert llama.engine.load() == {"running": 0, "waiting": 0}


async def test_prefix_cache_hit_is_reported_and_exact(llama: GenerativeModel) -> None:
    system = "You are a careful assistant. " + " ".join(["Always answer with the weather in Paris."] * 20)
    first = llama.engine.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": "hello"}])
    second = llama.engine.apply_chat_template([{"role": "system", "content": system},
                                               {"role": "user", "content": "what is the temperature in Tokyo?"}])
    await run(llama, first, max_tokens=4)
    tokens, _, b = await run(llama, second, max_tokens=10, ignore_eos=True)
    common = next(i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y)
    assert b.cached_tokens >= common - 1 > 100
    reference = hf_greedy(llama, second, 10)
    assert tokens[: len(reference)] == reference  # reusing the cache does not change the result


async def test_cancellation_frees_capacity(llama: GenerativeModel) -> None:
    ids = prompt(llama, "write a long story")
    req = GenerationRequest("long", ids, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    stream = llama.engine.generate(req)
    got = 0
    async for chunk in stream:
        got += len(chunk.token_ids)
        if got >= 3:
            break
    await stream.aclose()
    for _ in range(200):
        if llama.engine.load()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert llama.engine.load() == {"running": 0, "waiting": 0}
    assert llama.engine.cache.num_free == len(llama.engine.cache.slots)
    tokens, _, _ = await run(llama, ids, max_tokens=3)  # the engine keeps serving
    assert tokens


async def test_deadline_ends_the_sequence(llama: GenerativeModel) -> None:
    ids = prompt(llama, "count to a thousand")
    req = GenerationRequest("d", ids, SamplingParams(max_tokens=450, temperature=0, ignore_eos=True),
                            deadline=time.monotonic() + 0.05)
    chunks = [c async for c in llama.engine.generate(req)]
    assert chunks[-1].finish_reason == "deadline" and chunks[-1].completion_tokens < 450


async def test_stop_string_is_not_echoed(llama: GenerativeModel) -> None:
    ids = prompt(llama, "say something about the weather")
    _, full, _ = await run(llama, ids, max_tokens=40, ignore_eos=True)
    assert len(full) > 10, full
    stop = full[5:8]
    cut = full.index(stop)
    _, text, last = await run(llama, ids, max_tokens=40, ignore_eos=True, stop=[stop, "never-appears"])
    assert text == full[:cut]
    assert last.finish_reason == "stop" and last.stop_string == stop


async def test_eos_and_stop_token_ids_end_without_echo(llama: GenerativeModel) -> None:
    ids = prompt(llama, "hello")
    tokens, _, _ = await run(llama, ids, max_tokens=30, ignore_eos=True)
    stop_id = tokens[4]
    first = tokens.index(stop_id)
    t2, text2, last = await run(llama, ids, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id])
    assert t2 == tokens[: first + 1] and last.finish_reason == "stop"
    assert text2 == llama.engine.tokenizer.decode(tokens[:first], skip_special_tokens=True)


async def test_sampling_seed_is_reproducible(llama: GenerativeModel) -> None:
    ids = prompt(llama, "random words please")
    a = await run(llama, ids, max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    b = await run(llama, ids, max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    c = await run(llama, ids, max_tokens=16, temperature=1.0, seed=8, ignore_eos=True)
    assert a[0] == b[0] and a[0] != c[0]


async def test_presence_penalty_and_logprobs(llama: GenerativeModel) -> None:
    ids = prompt(llama, "repeat repeat repeat")
    tokens, _, _ = await run(llama, ids, max_tokens=30, ignore_eos=True, presence_penalty=1e4)
    assert len(set(tokens)) == len(tokens)
    req = GenerationRequest("lp", ids, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    lps = [lp for c in [c async for c in llama.engine.generate(req)] for lp in (c.logprobs or [])]
    assert len(lps) == 5
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3 and lp.top[0][2] >= lp.top[-1][2]
        assert lp.token_id == lp.top[0][0]  # greedy picks the most likely token


class Digits:
    """A constraint that forces the token sequence for "42" followed by the end."""

    def __init__(self, allowed_seq: list[int]) -> None:
        self.seq, self.pos = allowed_seq, 0

    def allowed_mask(self, vocab_size: int) -> np.ndarray | None:
        mask = np.zeros(vocab_size, dtype=bool)
        mask[self.seq[self.pos]] = True
        return mask

    def accept(self, token_id: int) -> None:
        assert token_id == self.seq[self.pos]
        self.pos += 1

    def is_finished(self) -> bool:
        return self.pos == len(self.seq)


async def test_constraint_forces_tokens(llama: GenerativeModel) -> None:
    tok = llama.engine.tokenizer
    forced = tok.encode('{"answer": 42}', add_special_tokens=False)
    req = GenerationRequest("c", prompt(llama, "answer in json"), SamplingParams(max_tokens=50, temperature=0.7),
                            constraint=Digits(forced))
    chunks = [c async for c in llama.engine.generate(req)]
    assert "".join(c.text for c in chunks) == '{"answer": 42}'
    assert chunks[-1].finish_reason == "stop"


async def test_context_limit_error(llama: GenerativeModel) -> None:
    req = GenerationRequest("x", [5] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(InvalidRequestError, match=r"maximum context length is 512 tokens\. However, you requested 600"):
        async for _ in llama.engine.generate(req):
            pass
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(logprobs=99), dict(max_tokens=0)):
        with pytest.raises(InvalidRequestError):
            async for _ in llama.engine.generate(GenerationRequest("b", [5, 6], SamplingParams(**bad))):
                pass
    with pytest.raises(InvalidRequestError, match="empty"):
        async for _ in llama.engine.generate(GenerationRequest("e", [], SamplingParams())):
            pass
    # without max_tokens the sequence may use the rest of the context, then ends with 'length'
    tokens, _, last = await run(llama, [5] * 500, ignore_eos=True)
    assert last.finish_reason == "length" and len(tokens) == 12


def test_chat_template_with_tools_and_kwargs(llama: GenerativeModel) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    ids = llama.engine.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                           tools, enable_thinking=False)
    text = llama.engine.tokenizer.decode(ids)
    assert "get_weather" in text and "<tools>" in text and text.endswith("<think>\n\n</think>\n\n")


def test_load_reports_progress_and_bad_models(llm_models: dict[str, Path], tmp_path: Path) -> None:
    seen: list[tuple[float, str]] = []
    model = load(llm_models["qwen2"], tmp_path / "a", progress=lambda p, w: seen.append((p, w)))
    model.close()
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert {w for _, w in seen} >= {"reading weights", "warming up"} and seen[-1][0] >= 95
    with pytest.raises(ModelSpecError, match=r"config\.json"):
        load(tmp_path, tmp_path / "b")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelFormatError, match=r"runs llama.*backend: llamacpp"):
        load(tmp_path / "gpt2", tmp_path / "c")


async def test_full_queue_is_rejected_and_priority_admits_first(llama: GenerativeModel) -> None:
    engine = llama.engine
    slots = len(engine.cache.slots)
    ids = prompt(llama, "busy")
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    streams = [engine.generate(GenerationRequest(f"busy{i}", ids, long)) for i in range(slots)]
    for s in streams:
        await s.__anext__()  # all slots are decoding now
    order: list[str] = []

    async def waiter(name: str, priority: int) -> None:
        req = GenerationRequest(name, ids, SamplingParams(max_tokens=1), priority=priority)
        async for _ in engine.generate(req):
            order.append(name)

    old = engine.config.max_waiting
    engine.config.max_waiting = 2
    try:
        low = asyncio.create_task(waiter("low", 0))
        await asyncio.sleep(0.05)
        high = asyncio.create_task(waiter("high", 5))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="rate limit"):
            await waiter("rejected", 0)
    finally:
        engine.config.max_waiting = old
        for s in streams:
            await s.aclose()
    await asyncio.gather(low, high)
    assert order == ["high", "low"]


async def test_bfloat16_on_cpu(llm_models: dict[str, Path], tmp_path: Path) -> None:
    model = load(llm_models["llama"], tmp_path, dtype="bfloat16", max_model_len=256)
    try:
        assert model._model.dtype == torch.bfloat16 and model.engine.cache.dtype == torch.bfloat16
        tokens, _, last = await run(model, prompt(model, "hi"), max_tokens=5, ignore_eos=True)
        assert len(tokens) == 5 and last.finish_reason == "length"
    finally:
        model.close()


class Recorder:
    def __init__(self) -> None:
        self.tokens: list[tuple[int, int]] = []
        self.ttft: list[float] = []
        self.itl_tokens = 0
        self.usage: list[float] = []
        self.prefix: list[tuple[int, int]] = []

    def observe_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.append((prompt_tokens, completion_tokens))

    def observe_time_to_first_token(self, seconds: float) -> None:
        self.ttft.append(seconds)

    def observe_inter_token_latency(self, seconds: float, tokens: int = 1) -> None:
        assert seconds >= 0
        self.itl_tokens += tokens

    def set_kv_cache_usage(self, ratio: float) -> None:
        self.usage.append(ratio)

    def observe_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix.append((queried_tokens, hit_tokens))


async def test_llm_recorder_sees_tokens_latency_and_cache(llama: GenerativeModel) -> None:
    from inhouse.core.recorders import NULL_LLM_RECORDER

    rec = Recorder()
    llama.set_llm_recorder(rec)
    ids = prompt(llama, "measure me " * 20)
    try:
        await run(llama, ids, max_tokens=6, ignore_eos=True)
        await run(llama, ids, max_tokens=6, ignore_eos=True)
    finally:
        llama.engine.recorder = NULL_LLM_RECORDER
    assert rec.tokens == [(len(ids), 6), (len(ids), 6)]
    assert len(rec.ttft) == 2 and all(t > 0 for t in rec.ttft)
    assert rec.itl_tokens == 10  # every token after each request's first
    assert rec.prefix[0][0] == len(ids) and rec.prefix[1][1] == len(ids) - 1
    assert rec.usage and all(0 <= u <= 1 for u in rec.usage) and max(rec.usage) > 0


class BrokenConstraint:
    def allowed_mask(self, vocab_size: int) -> np.ndarray | None:
        raise RuntimeError("grammar bug")

    def accept(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


async def test_a_failing_constraint_ends_only_its_sequence(llama: GenerativeModel) -> None:
    ids = prompt(llama, "two requests")
    good = asyncio.create_task(run(llama, ids, max_tokens=8, ignore_eos=True))
    await asyncio.sleep(0.01)
    req = GenerationRequest("bad", ids, SamplingParams(max_tokens=8), constraint=BrokenConstraint())
    chunks = [c async for c in llama.engine.generate(req)]
    assert chunks[-1].finish_reason == "error"
    tokens, _, last = await good
    assert len(tokens) == 8 and last.finish_reason == "length"
