"""Constrained decoding with llguidance: JSON Schemas (``response_format``, required / named
tool calls) compiled once per request against the model's tokenizer, then one matcher per
sequence that tells the engine which tokens may come next. Output under a constraint always
parses and matches the schema, even from a small or weak model."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

import numpy as np

from inhouse.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Compact, predictable JSON: no free whitespace a weak model could loop on.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_lock = threading.Lock()
_tokenizers: dict[int, tuple[Any, Any]] = {}  # id(hf tokenizer) -> (hf tokenizer, LLTokenizer)


def ll_tokenizer(hf_tokenizer: Any) -> Any:
    """The llguidance view of a Hugging Face fast tokenizer (built once per tokenizer: ~1 s
    for a large vocabulary)."""
    import llguidance.hf

    key = id(hf_tokenizer)
    with _lock:
        hit = _tokenizers.get(key)
        if hit is not None and hit[0] is hf_tokenizer:
            return hit[1]
        try:
            tok = llguidance.hf.from_tokenizer(hf_tokenizer)
        except ValueError as err:
            raise InvalidRequestError(f"Constrained decoding needs a fast tokenizer: {err}") from None
        _tokenizers[key] = (hf_tokenizer, tok)
        return tok


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    tokenizer: Any  # LLTokenizer
    grammar: str
    eos_token: int


def compile_json_schema(hf_tokenizer: Any, schema: dict[str, Any]) -> CompiledGrammar:
    """Check and compile a schema; a schema llguidance cannot use is the client's 400."""
    import llguidance

    if not isinstance(schema, dict):
        raise InvalidRequestError("A JSON schema must be an object.", details={"param": "response_format"})
    tok = ll_tokenizer(hf_tokenizer)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as err:
        raise InvalidRequestError(f"The JSON schema is not valid: {err}",
                                  details={"param": "response_format"}) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
    if is_error:
        raise InvalidRequestError(
            f"The JSON schema cannot be used for constrained decoding: {messages[0] if messages else 'invalid'}",
            details={"param": "response_format"})
    return CompiledGrammar(tok, grammar, int(tok.eos_token))


class GrammarConstraint:
    """One sequence's matcher (implements llm.types.TokenConstraint)."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        import llguidance

        self._m = llguidance.LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
        self._eos = compiled.eos_token
        self._cached: np.ndarray | None = None
        if self._m.is_error():
            raise InvalidRequestError(f"The JSON schema cannot be used: {self._m.get_error()}")

    def _bits(self) -> np.ndarray:
        if self._cached is None:
            raw = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
            self._cached = np.unpackbits(raw, bitorder="little").astype(bool)
        return self._cached

    def allowed_mask(self, vocab_size: int) -> np.ndarray | None:
        if self._m.is_error():
            return None  # never block generation on a matcher failure; it is logged below
        bits = self._bits()
        if bits.shape[0] >= vocab_size:
            return bits[:vocab_size]
        out = np.zeros(vocab_size, dtype=bool)
        out[: bits.shape[0]] = bits
        return out

    def accept(self, token_id: int) -> None:
        self._cached = None
        if not self._m.consume_token(int(token_id)):
            log.warning("constraint rejected a sampled token", extra={"token": int(token_id),
                                                                      "reason": self._m.get_error()})

    def is_finished(self) -> bool:
        """Complete once nothing but end-of-sequence may follow."""
        if self._m.is_stopped():
            return True
        if not self._m.is_accepting():
            return False
        bits = self._bits()
        allowed = np.flatnonzero(bits)
        return allowed.size == 0 or (allowed.size == 1 and int(allowed[0]) == self._eos)


def tool_calls_schema(tools: list[dict[str, Any]], *, parallel: bool = True) -> dict[str, Any]:
    """``tool_choice: required``: a JSON array of one or more calls of the given tools."""
    variants = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]},
                       "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools]
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema
