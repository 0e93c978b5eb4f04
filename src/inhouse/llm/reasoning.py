"""Reasoning parsers: split a model's thinking from its answer, incrementally.

``think_tags``: ``<think>…</think>`` goes to ``reasoning_content``. Templates that open the
block themselves (Qwen3 with thinking on, DeepSeek-R1) leave only ``</think>`` in the output;
the parser is told so via ``prompt_opens_block``."""

from __future__ import annotations

from inhouse.errors import ModelSpecError
from inhouse.llm.tool_parsers import partial_suffix


class ThinkTagsParser:
    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, prompt_opens_block: bool = False) -> None:
        self._state = "thinking" if prompt_opens_block else "start"
        self._buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) deltas for this piece of text."""
        self._buf += text
        reasoning = content = ""
        while self._buf:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if not stripped or (self.OPEN.startswith(stripped) and stripped != self.OPEN):
                    return reasoning, content  # undecided yet
                if stripped.startswith(self.OPEN):
                    self._buf = stripped[len(self.OPEN):]
                    self._state = "thinking"
                else:
                    self._state = "answer"
                continue
            if self._state == "thinking":
                i = self._buf.find(self.CLOSE)
                if i < 0:
                    keep = partial_suffix(self._buf, self.CLOSE)
                    reasoning += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return reasoning, content
                reasoning += self._buf[:i]
                self._buf = self._buf[i + len(self.CLOSE):].lstrip("\n")
                self._state = "after"
                continue
            if self._state == "after":
                self._buf = self._buf.lstrip("\n")  # newlines right after </think> are dropped
                if not self._buf:
                    return reasoning, content
            self._state = "answer"
            content += self._buf
            self._buf = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self._state == "thinking":
            return buf, ""
        if self._state == "after":
            return "", ""
        return "", buf


REASONING_PARSERS = {"think_tags": ThinkTagsParser, "deepseek_r1": ThinkTagsParser, "qwen3": ThinkTagsParser}


def get_reasoning_parser(name: str) -> type[ThinkTagsParser]:
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ModelSpecError(
            f"reasoning_parser '{name}' is not known; use one of {', '.join(sorted(REASONING_PARSERS))}."
        )
    return cls
