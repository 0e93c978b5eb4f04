"""The managed KV cache: one slot per concurrent sequence, with prefix caching; on CPU its memory
follows the tokens sequences hold, within a token budget.

Each layer holds K and V as ``[slots, kv_heads, capacity, head_dim]``. A running sequence owns a
slot; its keys for position ``p`` live at ``[slot, :, p]``, so the decode step reads every
running sequence as one strided view (no gather, no concatenation) when their slots are
contiguous.

On CPU the cache is reserved at full length as zero pages of an anonymous memory map; a page is
committed only when a position is first written, and handed back (``trim``) when a slot is
reused or its sequence preempted. So memory is what the slots have written (``held``), not
``slots × max_model_len``: the engine admits sequences by the tokens they hold against
``token_budget`` and preempts the newest when running ones outgrow it (vLLM and llama.cpp
admit the same way with paged and unified caches). On GPUs ``capacity`` grows by doubling up to
``max_model_len`` for every slot, so there the slot count itself is sized by the budget.

A finished sequence's slot keeps its keys and the token ids they belong to. A new sequence whose
prompt starts with those tokens (an agent resending its system prompt and history) takes the
slot over and skips that prefix; if the prefix lives in a slot still in use, it is copied."""

from __future__ import annotations

import math
import mmap
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # ids at positions 0, 1, … (may run ahead of K/V)
    valid: int = 0  # how many leading positions hold computed K/V
    in_use: bool = False
    released_at: float = 0.0
    high: int = 0  # positions written since the slot's memory was last handed back (committed)


@dataclass(slots=True)
class PrefixHit:
    slot: int  # the slot the new sequence gets
    cached: int  # leading prompt tokens whose K/V are already in place
    copy_from: int | None = None  # copy ``cached`` positions from this (busy) slot first


def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, prefix_caching: bool = True,
                 initial_capacity: int = 256, token_budget: int | None = None) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.prefix_caching = prefix_caching
        self.slots = [Slot(i) for i in range(slots)]
        self._blocks: list[mmap.mmap] = []  # the CPU memory maps behind k and v, to hand pages back
        self.capacity = max_len if memory_follows_use(device) else min(max_len, initial_capacity)
        self.k = [self._alloc(self.capacity) for _ in range(layers)]
        self.v = [self._alloc(self.capacity) for _ in range(layers)]
        if token_budget is not None and not self._blocks:
            raise ValueError("a token budget needs a cache whose memory follows use (CPU memory maps)")
        # None: every slot may hold max_len tokens at once, so nothing needs counting
        self.token_budget = token_budget if token_budget is not None and token_budget < slots * max_len else None
        self._elsize = torch.empty((), dtype=dtype).element_size()

    def _alloc(self, capacity: int) -> torch.Tensor:
        shape = (len(self.slots), self.kv_heads, capacity, self.head_dim)
        if not memory_follows_use(self.device):
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        tensor, block = _mapped_zeros(shape, self.dtype)
        self._blocks.append(block)
        return tensor

    @property
    def held(self) -> int:
        """Token positions whose memory is committed, over all slots (free ones keep prefixes)."""
        return sum(s.high for s in self.slots)

    def wrote(self, slot: int, end: int) -> None:
        """Positions ``0 .. end-1`` of a slot now hold keys (their memory is committed)."""
        s = self.slots[slot]
        s.high = max(s.high, end)

    def trim(self, slot: int, keep: int) -> None:
        """Hand back the memory of a slot's positions from ``keep`` on (they read as zeros
        again); positions before ``keep`` and their prefix-cache entry stay."""
        s = self.slots[slot]
        if not self._blocks or s.high <= keep:
            return
        pos_bytes = self.head_dim * self._elsize
        head_bytes = self.capacity * pos_bytes
        page = mmap.PAGESIZE
        for block in self._blocks:
            for h in range(self.kv_heads):
                base = (slot * self.kv_heads + h) * head_bytes
                start = -(-(base + keep * pos_bytes) // page) * page  # whole pages only
                end = (base + s.high * pos_bytes) // page * page
                if end > start:
                    block.madvise(mmap.MADV_DONTNEED, start, end - start)
        s.high = keep
        s.valid = min(s.valid, keep)
        s.tokens = s.tokens[: s.valid]  # a new list: an in-use slot's list is its sequence's

    def reclaim(self, tokens: int) -> int:
        """Drop cached prefixes of free slots, least recently used first, until ``tokens``
        positions are handed back or none are left; returns how many were."""
        freed = 0
        for s in sorted((s for s in self.slots if not s.in_use and s.high), key=lambda s: s.released_at):
            if freed >= tokens:
                break
            freed += s.high
            self.trim(s.index, 0)
        return freed

    @property
    def num_free(self) -> int:
        return sum(not s.in_use for s in self.slots)

    def ensure_capacity(self, positions: int) -> None:
        """Make room for positions ``0 .. positions-1`` in every slot."""
        if positions <= self.capacity:
            return
        new_cap = self.capacity
        while new_cap < positions:
            new_cap *= 2
        new_cap = min(new_cap, self.max_len)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                grown = self._alloc(new_cap)
                grown[:, :, : self.capacity] = old
                store[i] = grown
        self.capacity = new_cap

    def acquire(self, prompt: list[int]) -> PrefixHit:
        """A free slot for a sequence with this prompt, reusing the longest cached prefix. At
        least the last prompt token is always left to compute (its logits start decoding)."""
        free = [s for s in self.slots if not s.in_use]
        if not free:
            raise RuntimeError("no free KV cache slot")  # the engine admits only when one is free
        limit = len(prompt) - 1
        best_free, best_free_len = None, 0
        best_busy, best_busy_len = None, 0
        if self.prefix_caching and limit > 0:
            arr = np.asarray(prompt[:limit], dtype=np.int64)
            for s in self.slots:
                n = _common_prefix(arr, s.tokens, s.valid)
                if s.in_use and n > best_busy_len:
                    best_busy, best_busy_len = s, n
                elif not s.in_use and n > best_free_len:
                    best_free, best_free_len = s, n
        if best_free is not None and best_free_len >= best_busy_len:
            chosen, hit = best_free, PrefixHit(best_free.index, best_free_len)
        else:
            # the least recently released slot, preferring empty ones and low indices (contiguity)
            chosen = min(free, key=lambda s: (bool(s.tokens), s.released_at, s.index))
            hit = PrefixHit(chosen.index, 0)
            if best_busy is not None:
                hit = PrefixHit(chosen.index, best_busy_len, best_busy.index)
        chosen.in_use = True
        if chosen.high > hit.cached and self.token_budget is not None:
            self.trim(chosen.index, hit.cached)  # an earlier sequence's tail: hand its memory back
        if hit.copy_from is not None:
            self._copy(hit.copy_from, chosen.index, hit.cached)
            self.wrote(chosen.index, hit.cached)
        chosen.tokens, chosen.valid = prompt, hit.cached
        return hit

    def _copy(self, src: int, dst: int, n: int) -> None:
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]

    def release(self, slot: int) -> None:
        """Free a slot; its valid positions stay reusable as a prefix."""
        s = self.slots[slot]
        s.in_use = False
        s.tokens = s.tokens[: s.valid] if self.prefix_caching else []
        s.valid = len(s.tokens)
        s.released_at = time.monotonic()


def memory_follows_use(device: torch.device) -> bool:
    """Whether this device's cache is a memory map whose pages are committed on first write."""
    return device.type == "cpu" and hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MADV_DONTNEED")


# Linux's MAP_NORESERVE (Python's mmap lacks the name before 3.13): a full-length reservation of
# many slots is address space, not memory, and must not be refused by the overcommit check
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


def _mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """Zeros in an anonymous private memory map: the OS supplies zero pages and commits each only
    when it is first written (the tensor keeps the map alive; unmapped when both are freed)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    block = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    return torch.frombuffer(block, dtype=torch.uint8)[:nbytes].view(dtype).view(shape), block


def _common_prefix(a: np.ndarray, tokens: list[int], valid: int) -> int:
    n = min(len(a), valid)
    if n == 0:
        return 0
    eq = a[:n] == np.asarray(tokens[:n], dtype=np.int64)
    return n if bool(eq.all()) else int(np.argmin(eq))
