"""``backend: vllm`` — a Hugging Face model folder served by vLLM on CUDA GPUs, run as a supervised
``vllm serve`` child per model version on a free loopback port with a per-start API key
(``backends/child_server.py``), relayed like llama.cpp's (``backends/relay.py``).

vLLM keeps its speed and features (paged KV cache, tensor parallelism, AWQ/GPTQ/FP8 checkpoints,
structured outputs); inhouse keeps the lifecycle, the public APIs, security and metrics. The
prompt is rendered and tokenized here with the folder's own tokenizer and chat template — the
same files vLLM reads — and generation streams from the child's OpenAI ``/v1/completions`` with
the prompt's token ids, so only the OpenAI API is assumed of the child (any OpenAI-compatible
server can stand in: the ``vllm_command`` setting). JSON output and forced tool calls reach it
as a JSON schema.

A vision-language model (its config says so, or ``vllm.images``) gets a chat with images through
the child's ``/v1/chat/completions`` instead, the images as data URLs in the content parts: vLLM
renders such a model's template and image placeholders itself (its multimodal processor decides
how many tokens an image takes). Text-only chats keep the token-id path."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from inhouse.backends import LoadContext
from inhouse.backends.child_server import ServerProcess
from inhouse.backends.llamacpp import _messages_for_server
from inhouse.backends.relay import (
    RelayEngine,
    RelayModel,
    SchemaConstraint,
    StreamState,
    check_relayable,
    launch,
    post,
)
from inhouse.core.spec import ModelSpec
from inhouse.errors import InferenceError, InvalidRequestError, ModelFormatError, ModelSpecError
from inhouse.llm.images import IMAGE_MARKER, image_format
from inhouse.llm.types import FinishReason, GenerationChunk, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled"}


def find_vllm(configured: Path | str | None) -> Path:
    """The ``vllm`` command: the ``vllm`` setting, else one on PATH. Raises 1001 saying how to get it."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ModelFormatError(f"The vllm setting (INHOUSE_VLLM) names {path}, which is not an executable file; "
                               "point it at the 'vllm' command of a vLLM install.")
    on_path = shutil.which("vllm")
    if on_path:
        return Path(on_path)
    raise ModelFormatError("backend: vllm needs vLLM's 'vllm' command, which was not found: install vLLM on the "
                           "CUDA server (pip install vllm) and put it on PATH or set vllm (INHOUSE_VLLM) to its "
                           "path; on a CPU machine, convert the model to GGUF ('inhouse convert SRC --to gguf') "
                           "and use backend: llamacpp.")


def _config(source: Path) -> dict[str, Any]:
    try:
        doc = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _config_max_len(source: Path) -> int | None:
    doc = _config(source)
    cfg = doc.get("text_config", doc)
    value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return int(value) if isinstance(value, int) else None


# vision-language model types vLLM serves whose configs may lack a vision_config
_VLM_TYPES = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "llava", "llava_next",
    "llava_onevision", "idefics3", "smolvlm", "mllama", "gemma3", "internvl_chat", "minicpmv", "pixtral",
    "mistral3", "paligemma", "phi3_v", "phi4mm", "llama4", "kimi_vl", "deepseek_vl_v2", "aya_vision",
})


def reads_images(spec: ModelSpec, source: Path) -> bool:
    """Whether the folder holds a vision-language model: ``vllm.images``, else its config.json."""
    if spec.vllm.images is not None:
        return spec.vllm.images
    doc = _config(source)
    return isinstance(doc.get("vision_config"), dict) or doc.get("model_type") in _VLM_TYPES


def serve_args(spec: ModelSpec, source: Path, private_dir: Path, max_model_len: int) -> list[str]:
    """``vllm serve`` arguments from model.yaml (without the listen address, which the child adds)."""
    cfg = spec.vllm
    util = cfg.gpu_memory_utilization or spec.engine.gpu_memory_fraction
    args = ["serve", str(source), "--served-model-name", spec.name, "--gpu-memory-utilization", str(util),
            "--tensor-parallel-size", str(cfg.tensor_parallel_size),
            "--max-num-seqs", str(cfg.max_num_seqs or spec.engine.max_num_seqs),
            "--max-model-len", str(max_model_len), "--dtype", cfg.dtype or spec.dtype,
            "--disable-uvicorn-access-log"]
    if cfg.quantization:
        args += ["--quantization", cfg.quantization]
    if cfg.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", cfg.tool_call_parser]
    if cfg.reasoning_parser:
        args += ["--reasoning-parser", cfg.reasoning_parser]
    if spec.chat_template is not None:
        template = private_dir / "chat_template.jinja"
        template.write_text(spec.chat_template)
        args += ["--chat-template", str(template)]
    return [*args, *cfg.extra_args]


class VllmBackend:
    name = "vllm"

    def load(self, ctx: LoadContext) -> VllmModel:
        spec = ctx.spec
        check_relayable(spec, "vllm", "vLLM", "weights")
        command: list[str] | None = ctx.options.get("vllm_command")
        if command:
            found = shutil.which(command[0])
            if found is None:
                raise ModelFormatError(f"The vllm_command setting starts with '{command[0]}', which is not an "
                                       "executable command.")
            binary, fixed = Path(found), list(command[1:])
        else:
            binary, fixed = find_vllm(ctx.options.get("vllm")), []
        source = ctx.hf_folder("put the model in the version folder or set 'source' to a local folder.")
        if ctx.progress is not None:
            ctx.progress(0, "verifying checksums")
        ctx.verify_listed()  # vLLM reads the folder itself
        tokenizer = _load_tokenizer(spec, source)
        cfg = spec.vllm
        max_len = cfg.max_model_len or spec.max_model_len or _config_max_len(source) or 4096
        child = ServerProcess(binary, name=spec.name, startup_timeout_s=cfg.startup_timeout_s, restarts=cfg.restarts,
                              label="vllm", listen="tcp", key_env=("VLLM_API_KEY", "LLAMA_API_KEY"))
        child.args = fixed or serve_args(spec, source, child.private_dir, max_len)
        images = reads_images(spec, source)
        model_type = _config(source).get("model_type")
        engine = launch(spec, child, ctx.progress,
                        lambda: VllmEngine(spec, child, tokenizer, max_len, images,
                                           model_type if isinstance(model_type, str) else None),
                        starting="vllm serve", label="vllm", failed=f"vLLM could not serve {source}")
        return VllmModel(spec, engine, child)


def _load_tokenizer(spec: ModelSpec, source: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelFormatError("backend: vllm renders prompts with the model's own tokenizer, which needs "
                               "transformers (a vLLM install brings it; else pip install 'inhouse[llm]').") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as err:
        raise ModelFormatError(f"Model '{spec.name}': cannot load the tokenizer from {source}: {err}") from None
    if spec.task == "chat" and not (spec.chat_template or getattr(tok, "chat_template", None)):
        raise ModelSpecError(f"Model '{spec.name}' has task 'chat' but its tokenizer has no chat template; set "
                             "'chat_template' in model.yaml or use task 'generate'.")
    return tok


class VllmModel(RelayModel):
    platform = "vllm"


class VllmEngine(RelayEngine):
    """Relays to the child's OpenAI ``/v1/completions`` with token-id prompts; chats with images
    to its ``/v1/chat/completions``."""

    def __init__(self, spec: ModelSpec, child: ServerProcess, tokenizer: Any, max_model_len: int,
                 accepts_images: bool = False, model_type: str | None = None) -> None:
        super().__init__(spec, child)
        self.tokenizer = tokenizer
        self.accepts_images = accepts_images
        self.model_type = model_type  # config.json's, for a tool-call format its template may not show
        self._chat_template = spec.chat_template
        self.max_model_len = self._served_max_len() or max_model_len

    def _served_max_len(self) -> int | None:
        r = self._client.get("/v1/models")
        r.raise_for_status()
        for m in r.json().get("data", []):
            if m.get("max_model_len"):  # vLLM says what it settled on
                return int(m["max_model_len"])
        return None

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                            *, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), tools=list(tools) if tools else None, chat_template=self._chat_template,
                add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **template_kwargs)
        except Exception as err:  # jinja2 errors, raise_exception() in templates
            raise InvalidRequestError(f"The chat template of model '{self._spec.name}' rejected the messages: "
                                      f"{err}") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def complete_blocking(self, prompt: str, max_tokens: int) -> str:
        self._require_ready()
        body = {"model": self._spec.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        choices = post(self._client, "/v1/completions", body, "vllm").get("choices") or [{}]
        return str(choices[0].get("text", ""))

    async def _request(self, client: httpx.AsyncClient, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        room = max(1, self.max_model_len - len(request.prompt_token_ids))
        if request.images:
            return "/v1/chat/completions", self._chat_body(request, room)
        body: dict[str, Any] = {
            "model": self._spec.name, "prompt": request.prompt_token_ids, "stream": True,
            # continuous_usage_stats: vLLM counts tokens on every chunk (others ignore it)
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": min(s.max_tokens, room) if s.max_tokens is not None else room,
            **_sampling(s),
        }
        _constrain(body, request)
        return "/v1/completions", body

    def _chat_body(self, request: GenerationRequest, room: int) -> dict[str, Any]:
        chat = request.chat
        if chat is None:
            raise InferenceError(f"Model '{self._spec.name}': a request with images came without its chat.")
        s = request.sampling
        body: dict[str, Any] = {
            "model": self._spec.name, "messages": chat_messages(chat.messages, request.images), "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "add_generation_prompt": True, **_sampling(s),
        }
        # the images' tokens are counted by the child alone: a limit up to the whole room is its to set
        if s.max_tokens is not None and s.max_tokens < room:
            body["max_tokens"] = s.max_tokens
        if chat.tools:  # rendered by the template; inhouse parses the calls from the text as on the other path
            body["tools"], body["tool_choice"] = chat.tools, "none"
        if chat.template_kwargs:
            body["chat_template_kwargs"] = chat.template_kwargs
        _constrain(body, request)
        return body

    def _read(self, data: dict[str, Any], state: StreamState) -> GenerationChunk | None:
        usage = data.get("usage") or None
        choices = data.get("choices") or []
        choice = choices[0] if choices else {}
        text = str(choice.get("text") or "") if "delta" not in choice else _delta_text(choice, state)
        if usage:
            state.prompt_tokens = int(usage.get("prompt_tokens") or state.prompt_tokens)
            state.completion_tokens = int(usage.get("completion_tokens") or state.completion_tokens)
        elif text:
            state.completion_tokens += 1  # a server without per-chunk usage sends a token per chunk
        reason = choice.get("finish_reason")
        if reason:
            state.pending_finish = _FINISH.get(str(reason), "stop")
            stop = choice.get("stop_reason")
            state.extra["stop_string"] = stop if isinstance(stop, str) else None
        finish = state.pending_finish
        # the finish comes with the usage totals: in the same chunk, or (vLLM) in one after it
        final = finish is not None and usage is not None
        if not final and not text:
            return None
        cached = int(((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return GenerationChunk([], text, finish if final else None, state.prompt_tokens, state.completion_tokens,
                               cached_tokens=min(cached, state.prompt_tokens) if final else 0,
                               stop_string=state.extra.get("stop_string") if final else None)


def _sampling(s: SamplingParams) -> dict[str, Any]:
    body: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p,
                            "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty}
    # vLLM's extensions to the OpenAI request (llama-server reads the same names)
    if s.top_k > 0:
        body["top_k"] = s.top_k
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.stop_token_ids:
        body["stop_token_ids"] = list(s.stop_token_ids)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    return body


def _constrain(body: dict[str, Any], request: GenerationRequest) -> None:
    if isinstance(request.constraint, SchemaConstraint):
        schema = request.constraint.schema
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        body["json_schema"] = schema  # llama-server's name for it on /v1/completions


def _data_url(image: bytes) -> str:
    return f"data:image/{image_format(image) or 'png'};base64,{base64.b64encode(image).decode()}"


def chat_messages(messages: list[dict[str, Any]], images: list[bytes]) -> list[dict[str, Any]]:
    """OpenAI chat messages for the child: each image marker becomes an ``image_url`` part holding
    the image itself as a data URL (the child never fetches anything), in the order the client
    sent them; tool-call arguments become JSON strings."""
    pending = iter(images)
    out = []
    for m in _messages_for_server(messages, IMAGE_MARKER):
        text = m.get("content")
        if isinstance(text, str) and IMAGE_MARKER in text:
            parts: list[dict[str, Any]] = []
            for i, piece in enumerate(text.split(IMAGE_MARKER)):
                image = next(pending, None) if i else None
                if image is not None:
                    parts.append({"type": "image_url", "image_url": {"url": _data_url(image)}})
                piece = piece.strip("\n")  # the newlines that joined the client's parts
                if piece:
                    parts.append({"type": "text", "text": piece})
            m = {**m, "content": parts}
        out.append(m)
    return out


def _delta_text(choice: dict[str, Any], state: StreamState) -> str:
    """A chat stream's text. Reasoning that a vLLM reasoning parser split off comes back inside
    ``<think>`` tags, so inhouse's own parser sees what the completions path gives it."""
    delta = choice.get("delta") or {}
    reasoning = str(delta.get("reasoning_content") or delta.get("reasoning") or "")
    text = ""
    if reasoning:
        if not state.extra.get("thinking"):
            text, state.extra["thinking"] = "<think>", True
        text += reasoning
    content = str(delta.get("content") or "")
    if state.extra.get("thinking") and (content or choice.get("finish_reason")):
        text, state.extra["thinking"] = text + "</think>", False
    return text + content
