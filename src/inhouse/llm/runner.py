"""One forward step over a mixed batch — decode rows (one new token each) and prefill chunks —
for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) and GLM-4 (the same block with
interleaved partial rotary embeddings and a norm after attention and after the MLP), reading and
writing the slot KV cache.

The weights and the rotary embedding are the Hugging Face modules themselves; only the
attention bookkeeping is ours. All new tokens of the step run through the projections and MLPs
as one flat ``[tokens, hidden]`` matrix (no padding); attention runs once for all decode rows
(a strided view of the cache when their slots are contiguous) and once per prefill chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from inhouse.llm.kv_cache import KVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "glm4")


@dataclass(slots=True)
class StepRow:
    slot: int
    start: int  # position of the first new token
    tokens: list[int]  # new tokens (1 for decode)
    want_logits: bool  # logits of the last new token are needed (to sample)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """GLM's rotation: dimensions (0, 1), (2, 3), … are the pairs, not the two halves."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _rope_pairs_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GLM-4: only the first ``cos.shape[-1]`` dimensions rotate (``partial_rotary_factor``);
    ``cos`` / ``sin`` were already repeated pairwise by ``_pairwise``."""
    d = cos.shape[-1]
    rot = x[..., :d] * cos + _rotate_pairs(x[..., :d]) * sin
    return torch.cat((rot, x[..., d:]), dim=-1) if d < x.shape[-1] else rot


def _pairwise(t: torch.Tensor) -> torch.Tensor:
    return t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1)


class DecoderRunner:
    def __init__(self, model: Any, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        cfg = model.config
        self.head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.device = next(model.parameters()).device
        self.qk_norm = hasattr(attn, "q_norm")
        self.glm = getattr(cfg, "model_type", "") == "glm4"
        self._rope = _rope_pairs_partial if self.glm else _rope_halves

    @torch.inference_mode()
    def forward(self, rows: list[StepRow]) -> torch.Tensor:
        """Run the rows; return float32 logits ``[rows wanting logits, vocab]`` in row order."""
        dev = self.device
        flat: list[int] = []
        pos: list[int] = []
        slot_of: list[int] = []
        for r in rows:
            flat.extend(r.tokens)
            pos.extend(range(r.start, r.start + len(r.tokens)))
            slot_of.extend([r.slot] * len(r.tokens))
        n_tok = len(flat)
        ids = torch.tensor(flat, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        slots_t = torch.tensor(slot_of, dtype=torch.long, device=dev)

        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        offsets = []
        off = 0
        for r in rows:
            offsets.append(off)
            off += len(r.tokens)
        decode_plan = self._decode_plan(rows, decode, offsets) if decode else None

        h = self.embed(ids)
        cos, sin = self.rotary(h.unsqueeze(0), positions.unsqueeze(0))
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, D]
        if self.glm:
            cos, sin = _pairwise(cos), _pairwise(sin)
        attn_out = torch.empty(n_tok, self.n_heads, self.head_dim, dtype=h.dtype, device=dev)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n_tok, self.n_heads, self.head_dim)
            k = attn.k_proj(x).view(n_tok, self.n_kv, self.head_dim)
            v = attn.v_proj(x).view(n_tok, self.n_kv, self.head_dim)
            if self.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc, vc = self.cache.k[li], self.cache.v[li]
            kc[slots_t, :, positions] = k
            vc[slots_t, :, positions] = v
            if decode_plan is not None:
                self._attend_decode(q, kc, vc, attn_out, decode_plan)
            for i, r in enumerate(rows):
                if len(r.tokens) > 1:
                    self._attend_prefill(q, kc, vc, attn_out, r, offsets[i])
            o = attn.o_proj(attn_out.view(n_tok, self.n_heads * self.head_dim))
            if self.glm:
                h = h + layer.post_self_attn_layernorm(o)
                h = h + layer.post_mlp_layernorm(layer.mlp(layer.post_attention_layernorm(h)))
            else:
                h = h + o
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        want = [offsets[i] + len(r.tokens) - 1 for i, r in enumerate(rows) if r.want_logits]
        if not want:
            return torch.empty(0, 0)
        last = self.norm(h[torch.tensor(want, device=dev)])
        logits: torch.Tensor = self.lm_head(last).float()
        return logits

    def _decode_plan(self, rows: list[StepRow], decode: list[int], offsets: list[int]) -> dict[str, Any]:
        dev = self.device
        slots = [rows[i].slot for i in decode]
        kv_len = max(rows[i].start for i in decode) + 1
        lo, hi = min(slots), max(slots) + 1
        contiguous = hi - lo == len(slots) and slots == sorted(slots)
        lens = torch.tensor([rows[i].start + 1 for i in decode], device=dev)
        mask = (torch.arange(kv_len, device=dev)[None, :] < lens[:, None])[:, None, None, :]
        token_idx = torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=dev)
        return {"slots": torch.tensor(slots, dtype=torch.long, device=dev), "kv_len": kv_len,
                "range": (lo, hi) if contiguous else None, "mask": mask, "token_idx": token_idx,
                "all_full": bool((lens == kv_len).all())}

    def _attend_decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, out: torch.Tensor,
                       plan: dict[str, Any]) -> None:
        kv_len = plan["kv_len"]
        if plan["range"] is not None:
            lo, hi = plan["range"]
            keys, values = kc[lo:hi, :, :kv_len], vc[lo:hi, :, :kv_len]
        else:
            keys, values = kc[plan["slots"], :, :kv_len], vc[plan["slots"], :, :kv_len]
        qd = q[plan["token_idx"]].unsqueeze(2)  # [B, H, 1, D]
        mask = None if plan["all_full"] else plan["mask"]
        o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask, scale=self.scaling,
                                           enable_gqa=self.n_heads != self.n_kv)
        out[plan["token_idx"]] = o.squeeze(2)

    def _attend_prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, out: torch.Tensor,
                        r: StepRow, off: int) -> None:
        n = len(r.tokens)
        end = r.start + n
        qp = q[off:off + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        keys, values = kc[r.slot:r.slot + 1, :, :end], vc[r.slot:r.slot + 1, :, :end]
        gqa = self.n_heads != self.n_kv
        if r.start == 0:
            o = F.scaled_dot_product_attention(qp, keys, values, is_causal=True, scale=self.scaling, enable_gqa=gqa)
        elif _FLASH_CPU is not None and q.device.type == "cpu":
            o = self._attend_after_prefix(qp, keys, values, r.start)
        else:
            qpos = torch.arange(r.start, end, device=self.device)
            mask = torch.arange(end, device=self.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=gqa)
        out[off:off + n] = o[0].transpose(0, 1)

    def _attend_after_prefix(self, qp: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             start: int) -> torch.Tensor:
        """A chunk after ``start`` cached positions, without a mask: the chunk attends to the
        prefix (every key visible) and, causally, to itself (a square causal block) — two flash
        calls whose outputs merge exactly by their log-sum-exps. A ``[n, start + n]`` mask would
        make the CPU kernel compute and mask every block, and convert the mask on each call."""
        assert _FLASH_CPU is not None
        o1, lse1 = _FLASH_CPU(qp, keys[:, :, :start], values[:, :, :start], 0.0, False, scale=self.scaling)[:2]
        o2, lse2 = _FLASH_CPU(qp, keys[:, :, start:], values[:, :, start:], 0.0, True, scale=self.scaling)[:2]
        w1 = torch.sigmoid(lse1 - lse2).unsqueeze(-1).to(o1.dtype)  # share of the prefix in the softmax
        return torch.lerp(o2, o1, w1)


# The CPU flash-attention kernel behind scaled_dot_product_attention, which also returns the
# log-sum-exp of each query's scores (needed to merge two partial attentions); None if absent.
_FLASH_CPU: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
