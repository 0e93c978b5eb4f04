"""``backend: llamacpp`` — GGUF models served by llama.cpp's own ``llama-server``, run as a
supervised child per model version (``backends/child_server.py``, relayed by ``backends/relay.py``).

The child keeps its speed and features (quantised kernels, KV cache, slots); inhouse keeps the
lifecycle, the public APIs, security and metrics. ``LlamaCppEngine`` is an ``LLMEngine``
(``llm/types.py``), so ``LLMService`` serves it like the built-in engine: a chat is rendered from
the GGUF's own Jinja template — in process with Jinja2 for plain text conversations when, at
load, it rendered the probe conversations exactly as the child does (``chat_template.py``), else
by the child (``/apply-template``, called on the event loop) — and the text streamed from
``/completion``, which tokenizes it as llama-server's own chat endpoint does. The child's first
event (``return_progress``, sent when its slot starts, before the prompt is evaluated) gives the
prompt's exact token count, on which the service checks the context window; a prompt past the
child's own context comes back as its ``exceed_context_size_error``, answered with the same
2030. JSON output and forced tool calls reach the child as a JSON
schema, which it turns into a grammar."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from inhouse.backends import LoadContext
from inhouse.backends.chat_template import LocalTemplate, plain, verified
from inhouse.backends.child_server import ServerProcess
from inhouse.backends.child_stream import StreamBroken, child_post
from inhouse.backends.relay import (
    RelayEngine,
    RelayModel,
    SchemaConstraint,
    StreamState,
    check_relayable,
    error_text,
    launch,
    post,
)
from inhouse.core.spec import ModelSpec
from inhouse.errors import InferenceError, InvalidRequestError, ModelFormatError, ModelSpecError
from inhouse.llm.images import IMAGE_MARKER
from inhouse.llm.types import FinishReason, GenerationChunk, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python's sdist that scripts/build_llama_server.sh builds
_GGUF_MAGIC = b"GGUF"
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
BUILD_HINT = "bash scripts/build_llama_server.sh"


def find_llama_server(configured: Path | str | None) -> Path:
    """The ``llama-server`` binary: the ``llama_server`` setting, else one on PATH, else the one
    the build script keeps in the user's cache folder. Raises 1001 naming both ways to get one."""
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise ModelFormatError(f"The llama_server setting (INHOUSE_LLAMA_SERVER) names {path}, which is not an "
                               f"executable file; build one with '{BUILD_HINT}' and point the setting at it.")
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    built = cache / "inhouse" / f"llama.cpp-{LLAMA_CPP_VERSION}" / "bin" / "llama-server"
    if built.is_file() and os.access(built, os.X_OK):
        return built
    raise ModelFormatError(f"backend: llamacpp needs llama.cpp's llama-server, which was not found: set "
                           f"llama_server (INHOUSE_LLAMA_SERVER) to its path, put it on PATH, or build it "
                           f"with '{BUILD_HINT}'.")


def _gguf_file(ctx: LoadContext) -> Path:
    """The GGUF to load: ``llamacpp.file``, else the only .gguf (or first split part) in the version."""
    spec, vdir = ctx.spec, ctx.version_dir
    named = spec.llamacpp.file
    if named is not None:
        path = vdir / named
        if not path.resolve().is_relative_to(vdir.resolve()):
            raise ModelSpecError(f"Model '{spec.name}': llamacpp.file '{named}' lies outside its version folder.")
        if not path.is_file():
            raise ModelSpecError(f"Model '{spec.name}' version {vdir.name} has no '{named}' (llamacpp.file); "
                                 f"put the GGUF file at {path}.")
        return path
    files = sorted(p for p in vdir.glob("*.gguf") if not p.name.startswith("mmproj"))
    firsts = [p for p in files if (m := _SPLIT.search(p.name)) is None or m.group(1) == "00001"]
    if len(firsts) != 1:
        found = ", ".join(p.name for p in firsts) or "none"
        raise ModelSpecError(f"Model '{spec.name}' version {vdir.name} must hold exactly one .gguf model (or the "
                             f"parts of one split model); found {found}. Name it with llamacpp.file.")
    return firsts[0]


def _check_gguf(spec: ModelSpec, path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(4)
    if head != _GGUF_MAGIC:
        raise ModelFormatError(f"Model '{spec.name}': {path.name} is not a GGUF file (it does not start with "
                               "'GGUF'); convert the model with llama.cpp's convert_hf_to_gguf.py.")


def _server_args(spec: ModelSpec, ctx: LoadContext, gguf: Path, private_dir: Path) -> list[str]:
    cfg = spec.llamacpp
    args = ["--model", str(gguf), "--ctx-size", str(cfg.ctx_size * cfg.parallel), "--parallel", str(cfg.parallel),
            "--kv-unified", "--jinja", "--no-webui", "--metrics", "--alias", spec.name]
    if cfg.threads is not None:
        args += ["--threads", str(cfg.threads)]
    if cfg.gpu_layers is not None:
        args += ["--n-gpu-layers", str(cfg.gpu_layers)]
    if cfg.cache_type_k is not None:
        args += ["--cache-type-k", cfg.cache_type_k]
    if cfg.cache_type_v is not None:
        args += ["--cache-type-v", cfg.cache_type_v]
    if cfg.flash_attn is not None:
        args += ["--flash-attn", cfg.flash_attn]
    if cfg.mmproj is not None:
        mmproj = ctx.version_dir / cfg.mmproj
        if not mmproj.is_file():
            raise ModelSpecError(f"Model '{spec.name}': llamacpp.mmproj '{cfg.mmproj}' is not a file in "
                                 f"{ctx.version_dir}.")
        args += ["--mmproj", str(mmproj)]
    if spec.chat_template is not None:  # model.yaml's own Jinja template wins over the file's
        template = private_dir / "chat_template.jinja"
        template.write_text(spec.chat_template)
        args += ["--chat-template-file", str(template)]
    elif cfg.chat_template != "gguf":
        args += ["--chat-template", cfg.chat_template]
    return [*args, *cfg.extra_args]


class LlamaCppBackend:
    name = "llamacpp"

    def load(self, ctx: LoadContext) -> LlamaCppModel:
        spec = ctx.spec
        check_relayable(spec, "llamacpp", "llama-server", "GGUF")
        binary = find_llama_server(ctx.options.get("llama_server"))
        gguf = _gguf_file(ctx)
        if ctx.progress is not None:
            ctx.progress(0, "verifying checksums")
        ctx.verify_listed()  # llama-server reads the files itself, past read_artefact's check
        _check_gguf(spec, gguf)
        cfg = spec.llamacpp
        child = ServerProcess(binary, name=spec.name, startup_timeout_s=cfg.startup_timeout_s,
                                   restarts=cfg.restarts)
        try:
            child.args = _server_args(spec, ctx, gguf, child.private_dir)
        except BaseException:
            child.stop()
            raise
        engine = launch(spec, child, ctx.progress, lambda: LlamaCppEngine(spec, child), starting="llama-server",
                        label="llama.cpp", failed=f"llama-server could not load {gguf.name}")
        return LlamaCppModel(spec, engine, child)


class LlamaCppModel(RelayModel):
    """A loaded GGUF model: ``engine`` for the LLM APIs, ``predict`` for v2 ``text_input``."""

    platform = "llamacpp"


class ServerTokenizer:
    """The tokenizer calls ``LLMService`` makes outside chats (completions' prompts, token
    counting), answered by the child (``/tokenize``, ``/detokenize``), so inhouse counts exactly
    the tokens llama.cpp will see. Blocking: the service calls it off the event loop."""

    def __init__(self, client: httpx.Client, n_vocab: int, chat_template: str | None) -> None:
        self._client = client
        self._n_vocab = n_vocab
        self.chat_template = chat_template

    def __len__(self) -> int:
        return self._n_vocab

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = {"content": text, "add_special": add_special_tokens, "parse_special": True}
        return [int(t) for t in post(self._client, "/tokenize", body, "llama-server")["tokens"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(post(self._client, "/detokenize", {"tokens": list(ids)}, "llama-server")["content"])


def _messages_for_server(messages: Sequence[dict[str, Any]], media_marker: str) -> list[dict[str, Any]]:
    """The service's messages carry tool-call arguments as objects (what HF templates want);
    llama-server takes OpenAI's form, a JSON string. Images stay with the request: in the text,
    the child's own media marker shows where each one goes."""
    out = []
    for m in messages:
        if "images" in m or IMAGE_MARKER in str(m.get("content") or ""):  # merged turns keep the marker only
            m = {k: v for k, v in m.items() if k != "images"}
            m["content"] = str(m.get("content") or "").replace(IMAGE_MARKER, media_marker)
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                f = dict(c.get("function", c))
                if not isinstance(f.get("arguments"), str):
                    f["arguments"] = json.dumps(f.get("arguments") or {})
                fixed.append({"id": c.get("id", ""), "type": "function", "function": f})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


_FINISH: dict[str, FinishReason] = {"limit": "length", "eos": "stop", "word": "stop"}


class LlamaCppEngine(RelayEngine):
    """Relays to llama-server's native API: ``/apply-template`` renders a chat, ``/completion``
    streams from its text (or from token ids, for completions' prompts)."""

    def __init__(self, spec: ModelSpec, child: ServerProcess) -> None:
        super().__init__(spec, child)
        props = self._get("/props")
        n_vocab = self._n_vocab()
        settings = props.get("default_generation_settings") or {}
        self.max_model_len = int(settings.get("n_ctx") or spec.llamacpp.ctx_size)
        self.max_model_len = min(self.max_model_len, spec.llamacpp.ctx_size)
        self.tokenizer = ServerTokenizer(self._client, n_vocab, props.get("chat_template") or None)
        # a projector (llamacpp.mmproj) that reads images; the marker is random per start
        self.accepts_images = bool((props.get("modalities") or {}).get("vision"))
        self._media_marker = str(props.get("media_marker") or "<__media__>")
        self.local_template: LocalTemplate | None = None  # plain chats rendered in process
        if spec.llamacpp.chat_template == "gguf" or spec.chat_template is not None:
            # (a built-in template named in model.yaml is llama-server's own code, not Jinja)
            self.local_template, why = verified(
                props.get("chat_template"), str(props.get("bos_token") or ""), str(props.get("eos_token") or ""),
                lambda messages: self._server_render(messages, None, True, {}))
            log.info("chat template rendered %s: %s", "in process" if self.local_template else "by llama-server",
                     why, extra={"model": spec.name})

    def _get(self, path: str) -> dict[str, Any]:
        r = self._client.get(path)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def _n_vocab(self) -> int:
        for m in self._get("/v1/models").get("data", []):
            meta = m.get("meta") or {}
            if meta.get("n_vocab"):
                return int(meta["n_vocab"])
        return 1 << 31  # unknown: let the child judge token ids

    def _template_body(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                       add_generation_prompt: bool, template_kwargs: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": _messages_for_server(messages, self._media_marker),
                                "add_generation_prompt": add_generation_prompt}
        if tools:
            body["tools"] = list(tools)
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        return body

    def _render_here(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                     add_generation_prompt: bool, template_kwargs: dict[str, Any]) -> str | None:
        """The prompt from the verified in-process template, for a plain chat; None: the child's."""
        local = self.local_template
        if local is None or tools or template_kwargs or not add_generation_prompt or not plain(messages):
            return None
        try:
            return local.render(messages)
        except Exception:  # the template refuses this chat: llama-server's answer (or error) stands
            return None

    def _server_render(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                       add_generation_prompt: bool, template_kwargs: dict[str, Any]) -> str:
        body = self._template_body(messages, tools, add_generation_prompt, template_kwargs)
        return str(post(self._client, "/apply-template", body, "llama-server")["prompt"])

    async def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                          *, add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """The chat as prompt text, for ``GenerationRequest.prompt_text``."""
        self._require_ready()
        here = self._render_here(messages, tools, add_generation_prompt, template_kwargs)
        if here is not None:
            return here
        body = self._template_body(messages, tools, add_generation_prompt, template_kwargs)
        try:
            status, answer = await child_post(self._child.address, "/apply-template", body, self._child.headers)
        except StreamBroken as err:
            raise InferenceError(f"llama-server is not reachable ({err}); retry shortly.") from None
        if status == 400:
            raise InvalidRequestError(f"llama-server refused the request: {error_text(answer.decode())}")
        if status != 200:
            raise InferenceError(f"llama-server answered /apply-template with HTTP {status}: "
                                 f"{error_text(answer.decode())}")
        return str(orjson.loads(answer)["prompt"])

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                            *, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """The chat's token ids as ``/completion`` counts them from its text (a BOS the template
        leaves out for the tokenizer to add included): blocking, for token counting."""
        self._require_ready()
        prompt = self._render_here(messages, tools, add_generation_prompt, template_kwargs)
        if prompt is None:
            prompt = self._server_render(messages, tools, add_generation_prompt, template_kwargs)
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def complete_blocking(self, prompt: str, max_tokens: int) -> str:
        self._require_ready()
        body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "cache_prompt": True}
        return str(post(self._client, "/completion", body, "llama-server")["content"])

    async def _request(self, client: httpx.AsyncClient, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        s: SamplingParams = request.sampling
        text = request.prompt_text
        prompt: Any = text if text is not None else request.prompt_token_ids
        if request.images:  # llama-server places images at the media markers of a text prompt
            if text is None:
                r = await client.post("/detokenize", json={"tokens": prompt})
                if r.status_code != 200:
                    raise InferenceError(f"llama-server answered /detokenize with HTTP {r.status_code}.")
                text = str(r.json()["content"])
            prompt = {"prompt_string": text,
                      "multimodal_data": [base64.b64encode(img).decode() for img in request.images]}
        body: dict[str, Any] = {
            "prompt": prompt, "stream": True, "return_tokens": True, "cache_prompt": True,
            # a text prompt's token count comes in the first event, sent as the slot starts
            "return_progress": text is not None,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": 0.0,
            "repeat_penalty": s.repetition_penalty, "frequency_penalty": s.frequency_penalty,
            "presence_penalty": s.presence_penalty, "ignore_eos": s.ignore_eos,
        }
        if s.max_tokens is not None:
            body["n_predict"] = s.max_tokens
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if isinstance(request.constraint, SchemaConstraint):
            body["json_schema"] = request.constraint.schema
        if request.deadline is not None:
            body["t_max_predict_ms"] = max(1, int((request.deadline - time.monotonic()) * 1000))
        return "/completion", body

    def _read(self, data: dict[str, Any], state: StreamState) -> GenerationChunk | None:
        progress = data.get("prompt_progress")
        if progress is not None:  # the first says how long the prompt is and how much was cached
            if state.extra.get("counted"):
                return None
            state.extra["counted"] = True
            state.prompt_tokens = int(data.get("tokens_evaluated") or 0)
            cached = min(int(progress.get("cache") or 0), state.prompt_tokens)
            return GenerationChunk([], "", None, state.prompt_tokens, 0, cached_tokens=cached)
        state.prompt_tokens = int(data.get("tokens_evaluated") or state.prompt_tokens)
        state.completion_tokens = int(data.get("tokens_predicted") or state.completion_tokens)
        tokens = list(data.get("tokens") or ())
        text = str(data.get("content", ""))
        if not data.get("stop"):
            return GenerationChunk(tokens, text, None, state.prompt_tokens, state.completion_tokens)
        cached = int((data.get("timings") or {}).get("cache_n") or 0)  # prompt tokens reused
        stop_type = str(data.get("stop_type", "eos"))
        reason: FinishReason = _FINISH.get(stop_type, "stop")
        deadline = state.request.deadline
        if deadline is not None and stop_type == "limit" and time.monotonic() >= deadline:
            reason = "deadline"
        stop_word = data.get("stopping_word") or None
        return GenerationChunk(tokens, text, reason, state.prompt_tokens, state.completion_tokens,
                               cached_tokens=min(cached, state.prompt_tokens),
                               stop_string=stop_word if stop_type == "word" else None)
