"""Incremental detokenisation and stop strings for one sequence.

Text is decoded over a short sliding window of token ids (the vLLM technique: decode the window
with and without the newest tokens and keep the difference) so each step costs O(1), multi-byte
characters split across tokens are held back until complete, and SentencePiece's leading-space
handling sees a few prompt tokens of context. Stop strings are never emitted: text that could be
the start of one is held back until it is known not to be."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = [s for s in stop if s]
        self.text = ""  # everything decoded so far (stop string excluded once found)
        self._emitted = 0  # characters of ``text`` already handed out
        self.stop_string: str | None = None

    def add(self, token_id: int) -> None:
        """Append one generated token (stop/EOS tokens are not added: they are never echoed)."""
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = self._tok.decode(self._ids[self._prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            if self.stop_string is None:
                self._append(new)

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        self.text += new
        hits = [(i, s) for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            i, s = min(hits)
            self.text, self.stop_string = self.text[:i], s
            self._emitted = min(self._emitted, len(self.text))

    def flush(self, final: bool) -> str:
        """Text that is safe to hand out now; with ``final`` everything that is left."""
        end = len(self.text) if final or self.stop_string is not None else len(self.text) - self._held_back()
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
