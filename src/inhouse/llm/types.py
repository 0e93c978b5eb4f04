"""The contract between the generation engine (``backend: transformers``, continuous batching)
and the protocol adapters (OpenAI, Anthropic, v2 gRPC streaming). Adapters never touch torch;
the engine never sees a wire format."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

FinishReason = Literal["stop", "length", "cancelled", "deadline", "error"]


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, never echoed in the text
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS ids
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: off; k ≥ 0: the sampled token's logprob plus top-k


class TokenConstraint(Protocol):
    """Constrained decoding (JSON schema, tool calls), implemented with llguidance/xgrammar by
    the adapters and applied by the engine at every decoding step of one sequence."""

    def allowed_mask(self, vocab_size: int) -> np.ndarray | None:
        """Boolean mask over the vocabulary for the next token, or None for no constraint."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the token the engine sampled."""
        ...

    def is_finished(self) -> bool:
        """True once the grammar is complete: the engine ends the sequence with 'stop'."""
        ...


@dataclass(slots=True)
class ChatInput:
    """The chat behind a prompt, for an engine that renders it itself with its images (vLLM
    renders a vision-language model's template and image placeholders on its own)."""

    messages: list[dict[str, Any]]  # normalised; an image stands in the text as IMAGE_MARKER
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]  # empty when prompt_text is set
    sampling: SamplingParams = field(default_factory=SamplingParams)
    constraint: TokenConstraint | None = None
    deadline: float | None = None  # time.monotonic() value; past it the sequence ends 'deadline'
    priority: int = 0
    images: list[bytes] = field(default_factory=list)  # in the order of the prompt's image markers
    chat: ChatInput | None = None  # set with images only
    # The rendered prompt, for an engine that tokenizes it itself (one with ``render_chat``): its
    # first chunk, before any token, carries the prompt's token count.
    prompt_text: str | None = None


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(slots=True)
class GenerationChunk:
    """What the engine yields for one sequence, as tokens come (possibly several per chunk)."""

    token_ids: list[int]  # new tokens since the previous chunk
    text: str  # their incrementally detokenized text; stop strings excluded
    finish_reason: FinishReason | None  # set on the last chunk only
    prompt_tokens: int
    completion_tokens: int  # total so far
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    stop_string: str | None = None  # which stop string ended it, if one did


class LLMEngine(Protocol):
    """A loaded generation model. ``LoadedModel.engine`` of a chat/generate model is one.

    An engine in another process that renders and tokenizes prompts itself (llama-server) may
    also have ``async render_chat(messages, tools, *, add_generation_prompt, **template_kwargs)
    -> str``: the service then sends the text (``GenerationRequest.prompt_text``) instead of
    token ids and checks the context window on the first chunk, which carries the count."""

    max_model_len: int
    tokenizer: Any  # a transformers PreTrainedTokenizerBase

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                            *, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Prompt token ids for a chat, from the model's own chat template (or the spec's
        override), with tools passed to the template."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream one sequence. It joins the running batch at the next decoding step; closing
        the iterator (or cancelling the consuming task) aborts it and frees its KV cache."""
        ...


class Embedder(Protocol):
    """A loaded encoder. ``LoadedModel.embedder`` of an embedding model is one."""

    max_model_len: int
    tokenizer: Any

    async def embed(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
        """Pooled (per the spec) embeddings [n, dim] float32, and the number of input tokens."""
        ...
