"""Sentence embeddings from a Hugging Face encoder: tokenise, run, pool (mean / cls / last),
optionally L2-normalise. Implements ``inhouse.llm.types.Embedder``; the model runs on its own
thread so the event loop stays free."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from inhouse.errors import InvalidRequestError
from inhouse.llm.context_window import check_context

_BATCH = 32


class Encoder:
    def __init__(self, model: Any, tokenizer: Any, *, max_len: int, pooling: str, normalize: bool,
                 name: str) -> None:
        self._model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_len
        self._pooling = pooling
        self._normalize = normalize
        self._name = name
        self._device = next(model.parameters()).device
        self.dim = int(model.config.hidden_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inhouse-embed-{name}")
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    async def embed(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.embed_blocking, texts)

    def embed_blocking(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
        if len(texts) == 0:
            raise InvalidRequestError("The input is empty; send at least one text to embed.")
        ids = [self._encode(t) for t in texts]
        for i, row in enumerate(ids):
            check_context(self.max_model_len, len(row), None, input_index=i)
            if not row:
                raise InvalidRequestError(f"Input {i} is empty; every input needs at least one token.")
        out = [self._run(ids[i:i + _BATCH]) for i in range(0, len(ids), _BATCH)]
        return np.concatenate(out).astype(np.float32), sum(len(r) for r in ids)

    def _encode(self, item: Any) -> list[int]:
        if isinstance(item, str):
            return list(self.tokenizer.encode(item, add_special_tokens=True))
        if isinstance(item, Sequence) and all(isinstance(t, int) for t in item):
            vocab = int(self._model.config.vocab_size)
            if any(not 0 <= t < vocab for t in item):
                raise InvalidRequestError(f"Token ids must lie in [0, {vocab}).")
            return list(item)
        raise InvalidRequestError("Each input must be a string or a list of token ids.")

    @torch.inference_mode()
    def _run(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        elif self._pooling == "last":
            pooled = hidden[torch.arange(len(rows)), mask.sum(1) - 1]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        if self._normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        out: np.ndarray = pooled.cpu().numpy()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._model = None
