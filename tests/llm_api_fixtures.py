"""A model repository and server for the OpenAI / Anthropic API tests: tiny random chat models
with different tool-call and reasoning parsers, an encoder and an ONNX model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import RunningServer, run_server
from llm_fixtures import CHAT_TEMPLATE, write_llm_model
from models import add_model, write_model

CHAT, LLAMA, THINK, BERT = "qwen-chat", "llama-chat", "qwen-think", "tiny-bert"
_ENGINE = {"max_num_seqs": 16, "max_num_batched_tokens": 1024}
# A Qwen3-style override: with thinking on, the template opens the <think> block itself.
_THINK_OPEN = "{%- if enable_thinking is defined and enable_thinking is false %}"
THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    _THINK_OPEN + "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    _THINK_OPEN + "{{- '<think>\\n\\n</think>\\n\\n' }}{%- else %}{{- '<think>\\n' }}{%- endif %}")
assert THINK_TEMPLATE != CHAT_TEMPLATE


def build_llm_repo(root: Path, models: dict[str, Path], only: list[str] | None = None) -> Path:
    """qwen-chat (Qwen2-style, hermes tool calls, also served as gpt-4o-mini), llama-chat
    (Llama-style, llama3_json), qwen-think (think_tags reasoning), tiny-bert (embeddings) and
    the ONNX model 'add'."""
    root.mkdir(parents=True)
    specs: dict[str, tuple[Path, dict[str, Any]]] = {
        CHAT: (models["qwen2"], {"served_names": ["gpt-4o-mini"], "tool_call_parser": "hermes",
                                 "max_model_len": 1024, "engine": _ENGINE}),
        LLAMA: (models["llama"], {"tool_call_parser": "llama3_json", "max_model_len": 1024, "engine": _ENGINE}),
        THINK: (models["qwen2"], {"reasoning_parser": "think_tags", "tool_call_parser": "hermes",
                                  "chat_template": THINK_TEMPLATE, "max_model_len": 1024,
                                  "engine": {"max_num_seqs": 4}}),
        BERT: (models["bert"], {"task": "embedding", "pooling": "mean"}),
    }
    for name, (source, spec) in specs.items():
        if only is None or name in only:
            write_llm_model(root, name, source, spec)
    if only is None:
        write_model(root, "add", add_model(), {"inputs": [
            {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]})
    return root


@pytest.fixture(scope="session")
def llm_api_server(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> Iterator[RunningServer]:
    """One server for the OpenAI and Anthropic API tests (loading the models is the slow part)."""
    root = build_llm_repo(tmp_path_factory.mktemp("llm") / "models", llm_models)
    with run_server(root, llm_max_pending=64) as s:
        yield s


