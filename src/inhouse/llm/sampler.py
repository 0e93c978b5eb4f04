"""Choosing the next token from logits: penalties, constraints, greedy or temperature / top-k /
top-p sampling with an optional per-request seed, and logprobs. Plain greedy rows (the common
agent case) are taken with one batched argmax; the rest row by row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inhouse.llm.types import SamplingParams, TokenConstraint


@dataclass
class SamplerState:
    """Per-sequence sampling state: the RNG and token counts for penalties."""

    params: SamplingParams
    constraint: TokenConstraint | None
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def simple_greedy(self) -> bool:
        p = self.params
        return (p.temperature == 0 or p.top_k == 1) and self.constraint is None and p.logprobs is None \
            and not self._penalised()

    def _penalised(self) -> bool:
        p = self.params
        return p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_penalty != 1.0

    def record(self, token_id: int) -> None:
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        if self.constraint is not None:
            self.constraint.accept(token_id)


@dataclass(slots=True)
class Sampled:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def sample(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[Sampled]:
    """One token per row of ``logits`` [n, vocab] (float32)."""
    out: list[Sampled | None] = [None] * len(states)
    greedy_rows = [i for i, s in enumerate(states) if s.simple_greedy]
    if greedy_rows:
        ids = logits[greedy_rows].argmax(dim=-1).tolist()
        for i, t in zip(greedy_rows, ids, strict=True):
            out[i] = Sampled(int(t))
    for i, s in enumerate(states):
        if out[i] is None:
            out[i] = _sample_row(logits[i], s)
    return [o for o in out if o is not None]


def _sample_row(row: torch.Tensor, s: SamplerState) -> Sampled:
    p = s.params
    row = row.clone()
    vocab = row.shape[-1]
    if s.counts and (p.frequency_penalty or p.presence_penalty):
        ids = torch.tensor(list(s.counts), dtype=torch.long, device=row.device)
        cnt = torch.tensor(list(s.counts.values()), dtype=row.dtype, device=row.device)
        row[ids] -= p.frequency_penalty * cnt + p.presence_penalty
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(s.prompt_ids) | set(s.counts)), dtype=torch.long, device=row.device)
        seen = seen[seen < vocab]
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if s.constraint is not None:
        mask = s.constraint.allowed_mask(vocab)
        if mask is not None:
            allowed = torch.from_numpy(np.asarray(mask, dtype=bool)[:vocab]).to(row.device)
            if allowed.shape[0] < vocab:
                allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[0]), value=False)
            if bool(allowed.any()):
                row = row.masked_fill(~allowed, float("-inf"))
    logprobs = torch.log_softmax(row, dim=-1) if p.logprobs is not None else None
    if p.temperature == 0 or p.top_k == 1:
        token = int(row.argmax())
    else:
        scaled = row / max(p.temperature, 1e-5)
        if p.top_k > 0 and p.top_k < vocab:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > p.top_p  # keep the smallest set whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        token = int(torch.multinomial(probs, 1, generator=s.generator))
    if logprobs is None:
        return Sampled(token)
    top: list[tuple[int, float]] = []
    if p.logprobs and p.logprobs > 0:
        vals, idx = torch.topk(logprobs, min(p.logprobs, vocab))
        top = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    return Sampled(token, float(logprobs[token]), top)


def make_generator(seed: int | None, device: Any) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
