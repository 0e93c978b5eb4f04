"""What the core reports to observability, as small interfaces. The core calls these; the
observability package implements them (Prometheus, OpenTelemetry). The null versions cost one
method call, so an uninstrumented server pays nothing else."""

from __future__ import annotations

from typing import Any, Protocol


class SchedulerRecorder(Protocol):
    """Called by a scheduler / batcher for one model version."""

    def observe_queue(self, seconds: float) -> None:
        """A request waited ``seconds`` between submission and the start of its backend call.
        Called once per request. Called inside the request's context (a batcher keeps
        ``contextvars.copy_context()`` per queued request and calls ``ctx.run(...)``), the time
        also lands in that request's access-log line and trace."""

    def observe_compute(self, seconds: float, batch_size: int = 1) -> None:
        """One backend call that served ``batch_size`` requests took ``seconds``."""


class LLMRecorder(Protocol):
    """Called by a generation engine for one model version."""

    def observe_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A finished (or aborted) generation request and its token counts."""

    def observe_time_to_first_token(self, seconds: float) -> None: ...

    def observe_inter_token_latency(self, seconds: float, tokens: int = 1) -> None:
        """``tokens`` tokens arrived ``seconds`` after the previous one(s) (per-token mean)."""

    def set_kv_cache_usage(self, ratio: float) -> None:
        """Fraction (0..1) of the KV cache in use now."""

    def observe_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        """Prompt tokens looked up in the prefix cache and how many were found there."""


class Recorders(Protocol):
    """Hands out recorders per model version (the manager asks once per load)."""

    def scheduler(self, model: str, version: int) -> SchedulerRecorder: ...

    def llm(self, model: str, version: int) -> LLMRecorder: ...


class InferObserver(Protocol):
    """Sees every data-plane inference once, with its outcome."""

    def infer_done(self, model: str, version: int, seconds: float) -> None: ...

    def infer_failed(self, model: str, version: int | None, error: BaseException, seconds: float | None) -> None:
        """``seconds`` is None for requests rejected before they reached the data plane."""


class StatisticsSource(Protocol):
    """Per-version inference statistics in the v2 statistics extension's layout."""

    def snapshot(self, versions: list[tuple[str, int]]) -> list[dict[str, Any]]: ...


class NullSchedulerRecorder:
    def observe_queue(self, seconds: float) -> None:
        pass

    def observe_compute(self, seconds: float, batch_size: int = 1) -> None:
        pass


class NullLLMRecorder:
    def observe_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        pass

    def observe_time_to_first_token(self, seconds: float) -> None:
        pass

    def observe_inter_token_latency(self, seconds: float, tokens: int = 1) -> None:
        pass

    def set_kv_cache_usage(self, ratio: float) -> None:
        pass

    def observe_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None:
        pass


NULL_SCHEDULER_RECORDER = NullSchedulerRecorder()
NULL_LLM_RECORDER = NullLLMRecorder()


class NullRecorders:
    def scheduler(self, model: str, version: int) -> SchedulerRecorder:
        return NULL_SCHEDULER_RECORDER

    def llm(self, model: str, version: int) -> LLMRecorder:
        return NULL_LLM_RECORDER


NULL_RECORDERS = NullRecorders()


def attach_recorders(recorders: Recorders, model_name: str, version: int, scheduler: Any, model: Any) -> None:
    """Give a version's scheduler and loaded model their recorders, where they take one:
    a scheduler / batcher through ``set_recorder(SchedulerRecorder)``, a generation engine
    (the loaded model) through ``set_llm_recorder(LLMRecorder)``. Parts without the method
    simply go unmeasured."""
    set_scheduler = getattr(scheduler, "set_recorder", None)
    if callable(set_scheduler):
        set_scheduler(recorders.scheduler(model_name, version))
    set_llm = getattr(model, "set_llm_recorder", None)
    if callable(set_llm):
        set_llm(recorders.llm(model_name, version))
