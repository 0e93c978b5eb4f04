"""The one check that a request fits the model's context window (generation and embeddings)."""

from __future__ import annotations

from inhouse.errors import ContextLengthError


def check_context(limit: int, prompt_tokens: int, completion_tokens: int | None, *, input_index: int = 0) -> None:
    """Raise 2030 when the tokens do not fit ``limit``. Generation (``completion_tokens`` set, 0
    for "as many as fit") needs room for at least one new token; an embedding input (None) may
    fill the window."""
    if completion_tokens is None:
        if prompt_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, input {input_index} "
                f"has {prompt_tokens} tokens. Please shorten it.", details={"param": "input"})
        return
    if prompt_tokens >= limit or prompt_tokens + completion_tokens > limit:
        raise overflow(limit, prompt_tokens, completion_tokens)


def overflow(limit: int, prompt_tokens: int, completion_tokens: int) -> ContextLengthError:
    """The 2030 of a generation that does not fit, in the words clients parse (OpenAI's)."""
    total = max(prompt_tokens + completion_tokens, prompt_tokens + 1)
    return ContextLengthError(
        f"This model's maximum context length is {limit} tokens. However, you requested {total} tokens "
        f"({prompt_tokens} in the messages, {completion_tokens} in the completion). Please reduce the length of "
        "the messages or completion.", details={"param": "messages"})
