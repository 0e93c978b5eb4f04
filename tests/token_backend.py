"""A tiny real backend for tests: counts the UTF-8 bytes of a BYTES input as "tokens" and
reports them through the LLM recorder inhouse hands to models that take one."""

from __future__ import annotations

import time

import numpy as np

from inhouse.backends import LoadContext
from inhouse.core.recorders import NULL_LLM_RECORDER, LLMRecorder
from inhouse.core.spec import TensorSpec


class TokenCountingModel:
    platform = "test_tokens"

    def __init__(self) -> None:
        self.inputs = [TensorSpec(name="text", dtype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="tokens", dtype="INT64", shape=[-1])]
        self._recorder: LLMRecorder = NULL_LLM_RECORDER

    def set_llm_recorder(self, recorder: LLMRecorder) -> None:
        self._recorder = recorder

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        counts = np.array([len(t if isinstance(t, bytes) else str(t).encode()) for t in inputs["text"].ravel()],
                          dtype=np.int64)
        total = int(counts.sum())
        self._recorder.observe_time_to_first_token(time.perf_counter() - start)
        self._recorder.observe_tokens(prompt_tokens=total, completion_tokens=len(counts))
        self._recorder.set_kv_cache_usage(0.5)
        return {"tokens": counts}

    def close(self) -> None:
        pass


class TokenCountingBackend:
    name = "test-tokens"

    def load(self, ctx: LoadContext) -> TokenCountingModel:
        return TokenCountingModel()
