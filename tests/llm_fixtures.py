"""Tiny randomly initialised Hugging Face models for LLM tests, built on the fly (no download):
Llama- and Qwen2-style causal LMs and a BERT encoder, each saved as a local HF folder with a
byte-level BPE tokenizer trained here and a chat template that supports tools (Hermes/Qwen
``<tool_call>`` JSON) and ``<think>`` reasoning. Fixtures write model repositories using them.

Builders: ``build_causal_lm(dir, "llama" | "qwen2")``, ``build_encoder(dir)``.
Fixtures: ``llm_models`` (session: the three folders), ``llm_repo`` (a repository with
``tiny-llama`` (chat, served also as ``gpt-4o-mini``), ``tiny-qwen`` (chat, think_tags reasoning)
and ``tiny-bert`` (embedding))."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

# Special tokens of the chat format (Qwen / ChatML style); tool and think tags are added tokens
# that decode as text, like in Qwen2.5 / Qwen3.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
ADDED_TEXT_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]

CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}
{%- for p in content -%}{%- if p.type == 'text' -%}{{ p.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role in ['system', 'developer'] %}{{- text(messages[0].content) + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role in ['system', 'developer'] %}
{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role in ['system', 'developer'] and loop.first %}
{%- elif message.role in ['user', 'system', 'developer'] %}
{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{%- if message.content %}{{- text(message.content) }}{%- endif %}
{%- for tc in message.tool_calls or [] %}
{%- set f = tc.function if tc.function is defined else tc %}
{{- '\\n<tool_call>\\n{"name": "' + f.name + '", "arguments": ' }}
{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + text(message.content) + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

_WORDS = [
    'the', 'a', 'an', 'of', 'to', 'and', 'in', 'is', 'it', 'you', 'that', 'he', 'was', 'for', 'on', 'are', 'with',
    'as', 'I', 'his', 'they', 'be', 'at', 'one', 'have', 'this', 'from', 'or', 'had', 'by', 'hot', 'word', 'but',
    'what', 'some', 'we', 'can', 'out', 'other', 'were', 'all', 'there', 'when', 'up', 'use', 'your', 'how', 'said',
    'each', 'she', 'which', 'do', 'their', 'time', 'if', 'will', 'way', 'about', 'many', 'then', 'them', 'write',
    'would', 'like', 'so', 'these', 'her', 'long', 'make', 'thing', 'see', 'him', 'two', 'has', 'look', 'more',
    'day', 'could', 'go', 'come', 'did', 'number', 'sound', 'no', 'most', 'people', 'my', 'over', 'know', 'water',
    'than', 'call', 'first', 'who', 'may', 'down', 'side', 'been', 'now', 'find', 'any', 'new', 'work', 'part',
    'take', 'get', 'place', 'made', 'live', 'where', 'after', 'back', 'little', 'only', 'round', 'man', 'year',
    'came', 'show', 'every', 'good', 'me', 'give', 'our', 'under', 'name', 'very', 'through', 'just', 'form',
    'weather', 'city', 'Paris', 'London', 'Tokyo', 'temperature', 'celsius', 'fahrenheit', 'function', 'arguments',
    'name', 'location', 'unit', 'query', 'search', 'result', 'error', 'true', 'false', 'null', 'user', 'assistant',
    'system', 'tool', 'think', 'answer', 'question', 'hello', 'world', 'please', 'thanks', 'json', 'schema', 'type',
    'object', 'string', 'integer', 'number', 'array', 'properties', 'required'
]


def _corpus() -> list[str]:
    import random

    rng = random.Random(1234)
    lines = []
    for _ in range(600):
        n = rng.randint(4, 16)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice([".", "?", "!", ",", ":"]))
    for _ in range(200):
        obj = {rng.choice(_WORDS): rng.choice([rng.randint(0, 999), rng.choice(_WORDS), True, None])
               for _ in range(rng.randint(1, 4))}
        lines.append(json.dumps({"name": rng.choice(_WORDS), "arguments": obj}))
    lines += ["0123456789 {}[]()<>:;,.\"'\n\t-_+=*/\\|!?@#$%^&~`"] * 5
    return lines


def build_tokenizer(out_dir: Path, *, vocab_size: int = 512, encoder: bool = False) -> Any:
    """Train a byte-level BPE tokenizer and save it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if encoder else [ENDOFTEXT, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if encoder:
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_max_length=512)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                       model_max_length=2048)
        fast.add_tokens(ADDED_TEXT_TOKENS)
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_causal_lm(out_dir: Path, family: str = "llama", *, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, max_len: int = 2048, seed: int = 0) -> Path:
    """A tiny random ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` with its tokenizer, in ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)}
    common: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        initializer_range=0.2,  # spread-out logits: greedy choices are not near-ties
    )
    torch.manual_seed(seed)
    if family == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown family {family!r}")
    model.eval()
    model.save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=ids[ENDOFTEXT], eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
                     pad_token_id=ids[ENDOFTEXT]).save_pretrained(str(out_dir))
    return out_dir


def build_encoder(out_dir: Path, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A tiny random ``BertModel`` with a BPE tokenizer ([CLS] … [SEP]), in ``out_dir``."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir, vocab_size=384, encoder=True)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=hidden * 2,
                                 max_position_embeddings=512, pad_token_id=tok.pad_token_id))
    model.eval()
    model.save_pretrained(str(out_dir))
    return out_dir


def write_llm_model(repo: Path, name: str, source: Path, spec: dict[str, Any] | None = None,
                    version: int = 1) -> Path:
    """Write REPO/NAME/model.yaml (backend transformers, ``source`` pointing at the HF folder)
    and an empty version folder; returns the model folder."""
    mdir = repo / name
    (mdir / str(version)).mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"name": name, "backend": "transformers", "task": "chat", "source": str(source),
                           **(spec or {})}
    (mdir / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return mdir


@pytest.fixture(scope="session")
def llm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny HF folders, built once per test session: keys 'llama', 'qwen2', 'bert'."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": build_causal_lm(root / "tiny-llama", "llama"),
        "qwen2": build_causal_lm(root / "tiny-qwen2", "qwen2", seed=1),
        "bert": build_encoder(root / "tiny-bert"),
    }


@pytest.fixture
def llm_repo(tmp_path: Path, llm_models: dict[str, Path]) -> Path:
    """A repository: 'tiny-llama' (chat; also served as 'gpt-4o-mini'; hermes tool calls),
    'tiny-qwen' (chat; think_tags reasoning) and 'tiny-bert' (embedding, mean pooling)."""
    root = tmp_path / "models"
    root.mkdir()
    engine = {"max_num_seqs": 8, "max_num_batched_tokens": 512}
    write_llm_model(root, "tiny-llama", llm_models["llama"], {
        "served_names": ["gpt-4o-mini"], "tool_call_parser": "hermes", "max_model_len": 1024, "engine": engine})
    write_llm_model(root, "tiny-qwen", llm_models["qwen2"], {
        "tool_call_parser": "hermes", "reasoning_parser": "think_tags", "max_model_len": 1024, "engine": engine})
    write_llm_model(root, "tiny-bert", llm_models["bert"], {"task": "embedding", "pooling": "mean"})
    return root


def teach_completion(model_dir: Path, prompts: list[list[int]], completion: list[int], *, margin: float = 4.0,
                     max_steps: int = 600, seed: int = 0) -> int:
    """Train the causal LM in ``model_dir`` (in place) until greedy decoding after each prompt
    produces exactly ``completion``: under teacher forcing every completion token must be the
    argmax by at least ``margin`` logits — then greedy decoding, which feeds back exactly these
    tokens, reproduces the sequence with a safe distance from any near-tie. A real Transformers
    model whose weights make it emit a chosen reply (e.g. a tool call), not a mock. Returns the
    number of optimiser steps; raises if the margin is not reached."""
    import torch
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a busy machine
    try:
        return _teach(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), model_dir,
                      prompts, completion, margin, max_steps, seed)
    finally:
        torch.set_num_threads(threads)


def _teach(model: Any, model_dir: Path, prompts: list[list[int]], completion: list[int], margin: float,
           max_steps: int, seed: int) -> int:
    import torch

    torch.manual_seed(seed)
    model.train()
    rows = [p + completion for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    target = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        target[i, len(p) - 1: len(r) - 1] = torch.tensor(completion)  # logits at t predict token t + 1
    picked = target != -100
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(max_steps):
        logits = model(input_ids=ids, attention_mask=mask).logits  # no dropout in these configs
        sel = logits[picked]
        with torch.no_grad():
            right = sel.gather(1, target[picked][:, None])[:, 0]
            others = sel.detach().clone()
            others[torch.arange(len(others)), target[picked]] = float("-inf")
            if bool((right - others.max(dim=1).values > margin).all()):
                model.eval()
                model.save_pretrained(str(model_dir))
                return step
        loss = torch.nn.functional.cross_entropy(sel, target[picked])
        opt.zero_grad()
        loss.backward()
        opt.step()
    raise RuntimeError(f"the model did not learn the completion in {max_steps} steps")
