"""``backend: transformers`` — Hugging Face models from a local folder (never downloaded).

``task: chat | generate``: a causal LM served by the continuous-batching engine
(``LoadedModel.engine``). ``task: embedding``: an encoder with the spec's pooling
(``LoadedModel.embedder``). Both also answer KServe v2 with a BYTES ``text_input``.

A model encrypted at rest (``inhouse encrypt``) is built in memory from decrypted bytes
(``backends/hf_memory.py``); transformers never reads its files itself."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from inhouse.backends import LoadContext, hf_memory
from inhouse.backends.hf_memory import MemoryFolder
from inhouse.core.memory import release_freed_memory
from inhouse.core.recorders import LLMRecorder
from inhouse.core.spec import ModelSpec, TensorSpec
from inhouse.errors import (
    ArtefactIntegrityError,
    InvalidRequestError,
    ModelFormatError,
    ModelSpecError,
    OutOfMemoryError,
)
from inhouse.llm.embedder import Encoder
from inhouse.llm.engine import Engine, EngineConfig
from inhouse.llm.kv_cache import KVCache, bytes_per_token, memory_follows_use
from inhouse.llm.runner import SUPPORTED_MODEL_TYPES
from inhouse.llm.types import GenerationRequest, SamplingParams
from inhouse.security.crypto import MAGIC, is_encrypted, read_model_file

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_CPU_KV_FRACTION = 0.3  # of available RAM, when engine.kv_cache_bytes is not set


class TransformersBackend:
    name = "transformers"

    def load(self, ctx: LoadContext) -> GenerativeModel | EncoderModel:
        spec = ctx.spec
        source = ctx.hf_folder("set 'source' in model.yaml to a local folder saved with save_pretrained().")
        progress: Progress = getattr(ctx, "progress", None) or (lambda pct, what: None)
        device = _device(spec)
        dtype = _dtype(spec, device)
        files = HfFiles(ctx, source)
        try:
            if not files.encrypted:
                # from_pretrained reads the folder itself, past read_artefact's per-file check;
                # hashing also brings the files into the page cache for the reads that follow
                progress(0, "verifying checksums")
                ctx.verify_listed()
                _page_in(source, progress)
            if spec.task in ("chat", "generate"):
                return GenerativeModel.load(spec, files, device, dtype, progress)
            if spec.task == "embedding":
                return EncoderModel.load(spec, files, device, dtype, progress)
        except torch.OutOfMemoryError:
            raise OutOfMemoryError(f"Out of GPU memory while loading model '{spec.name}'; free the GPU, "
                                   "use a smaller dtype or a smaller model.") from None
        raise ModelSpecError(f"Model '{spec.name}': the transformers backend serves task 'chat', 'generate' "
                             f"or 'embedding', not '{spec.task}'.")


def _device(spec: ModelSpec) -> torch.device:
    d = spec.instances.device
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith(("cuda", "gpu")):
        if not torch.cuda.is_available():
            if spec.resources.gpu > 0:
                raise ModelSpecError(f"Model '{spec.name}' asks for resources.gpu: {spec.resources.gpu} but "
                                     "PyTorch sees no CUDA GPU; set resources.allow_cpu_fallback: true to run "
                                     "on the CPU, or remove resources.gpu.")
            raise ModelFormatError(f"Model '{spec.name}' asks for device '{d}' but PyTorch sees no CUDA GPU; "
                                   "set instances.device to cpu or auto.")
        return torch.device(d.replace("gpu", "cuda"))
    if d.startswith("npu"):
        raise ModelFormatError(f"Model '{spec.name}': device '{d}' is not supported by the transformers backend.")
    return torch.device("cpu")


def _dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec.dtype]


def _page_in(source: Path, progress: Progress) -> None:
    """Read the weight files once, reporting progress by bytes; the load that follows then
    maps them from the page cache. For multi-GB models this is where the time goes."""
    files = [p for p in sorted(source.iterdir()) if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    total = sum(p.stat().st_size for p in files) or 1
    done, last = 0, -1
    for p in files:
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                done += len(chunk)
                pct = int(80 * done / total)
                if pct != last:
                    progress(pct, "reading weights")
                    if pct // 10 != last // 10:
                        log.info("loading weights", extra={"model": source.name, "percent": pct})
                    last = pct


class HfFiles:
    """Where a model's parts come from: its Hugging Face folder as transformers reads it, or,
    when the model is encrypted at rest, memory (``hf_memory``: built from bytes decrypted by
    ``LoadContext``, never written to disk)."""

    def __init__(self, ctx: LoadContext, source: Path) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.source = source
        self.encrypted = ctx.spec.encryption is not None or any(
            _starts_encrypted(p) for p in source.iterdir() if p.is_file())
        self._memory = MemoryFolder(source, self._read, ctx.spec) if self.encrypted else None

    def _read(self, path: Path) -> bytes:
        """Checksum-verified (files in the version folder) and decrypted bytes of one file."""
        ctx = self.ctx
        if path.resolve().is_relative_to(ctx.version_dir.resolve()):
            data = ctx.read_artefact(str(path.resolve().relative_to(ctx.version_dir.resolve())))
        else:
            data = read_model_file(path, ctx.decryptor, self.spec)
        if is_encrypted(data):
            raise ArtefactIntegrityError(f"{path} of model '{self.spec.name}' is encrypted but this server has no "
                                         "model key; start it with --model-key-file.")
        return data

    def config(self) -> Any:
        if self._memory is not None:
            return hf_memory.load_config(self._memory)
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.source), local_files_only=True)

    def tokenizer(self) -> Any:
        if self._memory is not None:
            return hf_memory.load_tokenizer(self._memory)
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.source), local_files_only=True)
        except Exception as err:
            raise ModelFormatError(f"Model '{self.spec.name}': cannot load the tokenizer from {self.source}: "
                                   f"{err}") from None

    def generation_config(self) -> Any:
        if self._memory is not None:
            return hf_memory.load_generation_config(self._memory)
        from transformers import GenerationConfig

        try:
            return GenerationConfig.from_pretrained(str(self.source), local_files_only=True)
        except Exception:  # no generation_config.json: the config's and tokenizer's EOS are enough
            log.debug("no generation_config.json", extra={"model": self.spec.name})
            return None

    def model(self, causal_lm: bool, config: Any, dtype: torch.dtype) -> Any:
        if self._memory is not None:
            return hf_memory.load_model(self._memory, causal_lm, config, dtype)
        from transformers import AutoModel, AutoModelForCausalLM

        auto = AutoModelForCausalLM if causal_lm else AutoModel
        return auto.from_pretrained(str(self.source), local_files_only=True, dtype=dtype)


def _starts_encrypted(path: Path) -> bool:
    with path.open("rb") as f:
        return is_encrypted(f.read(len(MAGIC)))


def _eos_ids(files: HfFiles, tokenizer: Any, config: Any) -> list[int]:
    ids: set[int] = set()
    gen = files.generation_config()
    for v in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        ids.update([v] if isinstance(v, int) else (v or []))
    return sorted(ids)


def _kv_budget(spec: ModelSpec, device: torch.device) -> int:
    if spec.engine.kv_cache_bytes is not None:
        return spec.engine.kv_cache_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return max(0, int(spec.engine.gpu_memory_fraction * total) - used - (256 << 20))
    return int(psutil.virtual_memory().available * _CPU_KV_FRACTION)


def refusal(name: str, model_type: str, config: Any) -> str:
    """Why the built-in engine refuses a model, and which engine serves it instead."""
    vision = getattr(config, "vision_config", None) is not None or "vl" in model_type.split("_") or \
        model_type.endswith("v")
    head = (f"Model '{name}' is a '{model_type}' model; the built-in generation engine (backend: transformers) "
            f"runs {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if vision:
        return (f"{head} For this vision-language model use backend: vllm on a GPU server, or convert it with "
                "llama.cpp's convert_hf_to_gguf.py (the model and, with --mmproj, its projector) and use "
                "backend: llamacpp with llamacpp.mmproj.")
    return (f"{head} Convert it to GGUF ('inhouse convert SRC --to gguf --out REPO/NAME') and use backend: "
            "llamacpp, or serve it with backend: vllm on a GPU server.")


class GenerativeModel:
    """A loaded causal LM: ``engine`` for the OpenAI / Anthropic adapters, ``predict`` for v2."""

    platform = "transformers"

    def __init__(self, spec: ModelSpec, engine: Engine, model: Any) -> None:
        self.spec = spec
        self.engine = engine
        self._model = model
        self.inputs = [TensorSpec(name="text_input", dtype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="text_output", dtype="BYTES", shape=[-1])]

    @classmethod
    def load(cls, spec: ModelSpec, files: HfFiles, device: torch.device, dtype: torch.dtype,
             progress: Progress) -> GenerativeModel:
        config = files.config()
        mtype = getattr(config, "model_type", "?")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(refusal(spec.name, mtype, config))
        tokenizer = files.tokenizer()
        if spec.task == "chat" and not (spec.chat_template or getattr(tokenizer, "chat_template", None)):
            raise ModelSpecError(f"Model '{spec.name}' has task 'chat' but its tokenizer has no chat template; "
                                 "set 'chat_template' in model.yaml or use task 'generate'.")
        progress(85, "building model")
        model = files.model(True, config, dtype)
        model.to(device).eval()
        max_len = spec.max_model_len or int(getattr(config, "max_position_embeddings", 0) or 2048)
        window = getattr(config, "sliding_window", None)
        if window and (mtype == "mistral" or getattr(config, "use_sliding_window", False)) and max_len > window:
            log.warning("sliding-window attention is not implemented; limiting max_model_len to the window",
                        extra={"model": spec.name, "max_model_len": window})
            max_len = int(window)
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        per_token = bytes_per_token(layers, kv_heads, head_dim, dtype)
        budget = _kv_budget(spec, device)
        if budget < max_len * per_token:
            raise OutOfMemoryError(
                f"Model '{spec.name}': the KV cache budget of {budget >> 20} MiB holds {budget // per_token} tokens, "
                f"fewer than one sequence of max_model_len {max_len}; lower max_model_len or raise "
                "engine.kv_cache_bytes / engine.gpu_memory_fraction.")
        token_budget: int | None = None
        if memory_follows_use(device):
            # every slot, admitted by the tokens sequences hold: a long max_model_len does not
            # cut concurrency, only what the running sequences really use counts
            slots = spec.engine.max_num_seqs
            token_budget = budget // per_token
        else:
            slots = min(spec.engine.max_num_seqs, budget // (max_len * per_token))
            if slots < spec.engine.max_num_seqs:
                log.warning("KV cache budget limits concurrency",
                            extra={"model": spec.name, "max_num_seqs": slots, "budget_mib": budget >> 20})
        cache = KVCache(layers=layers, slots=slots, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len,
                        dtype=dtype, device=device, prefix_caching=spec.engine.prefix_caching,
                        token_budget=token_budget)
        engine = Engine(model=model, tokenizer=tokenizer, cache=cache, name=spec.name,
                        config=EngineConfig(max_model_len=max_len, max_num_seqs=slots,
                                            max_num_batched_tokens=spec.engine.max_num_batched_tokens,
                                            max_waiting=spec.batching.max_queue_size),
                        chat_template=spec.chat_template, eos_token_ids=_eos_ids(files, tokenizer, config))
        engine.start()
        self = cls(spec, engine, model)
        try:
            progress(95, "warming up")
            prompt = tokenizer.encode("Hello", add_special_tokens=False) or [0]
            engine.generate_blocking(GenerationRequest("warmup", prompt, SamplingParams(max_tokens=4, temperature=0,
                                                                                        ignore_eos=True)),
                                     timeout=600)
        except BaseException:
            self.close()
            raise
        log.info("generation engine ready", extra={"model": spec.name, "device": str(device), "dtype": str(dtype),
                                                   "max_num_seqs": slots, "max_model_len": max_len,
                                                   "kv_tokens": token_budget or slots * max_len})
        return self

    def set_llm_recorder(self, recorder: LLMRecorder) -> None:
        """Observability hook (core/recorders.py): tokens, TTFT, inter-token latency, KV usage."""
        self.engine.recorder = recorder

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        """v2: each ``text_input`` element is a raw prompt (no chat template); greedy, up to
        ``parameters.max_tokens`` (default 256) new tokens."""
        texts = [_text(x) for x in np.asarray(inputs["text_input"]).ravel()]
        max_tokens = int(self.spec.parameters.get("max_tokens", 256))
        tok = self.engine.tokenizer
        requests = []
        for i, t in enumerate(texts):
            ids = tok.encode(t, add_special_tokens=False)
            room = self.engine.max_model_len - len(ids)
            requests.append(GenerationRequest(f"v2-{i}", ids, SamplingParams(
                max_tokens=max(1, min(max_tokens, room)), temperature=0)))
        results = [text for _, text, _ in self.engine.generate_many_blocking(requests, timeout=600)]
        arr = np.array([r.encode() for r in results], dtype=object).reshape(np.asarray(inputs["text_input"]).shape)
        return {"text_output": arr}

    def close(self) -> None:
        self.engine.close()
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        release_freed_memory()


class EncoderModel:
    """A loaded encoder: ``embedder`` for /v1/embeddings, ``predict`` for v2."""

    platform = "transformers"

    def __init__(self, spec: ModelSpec, encoder: Encoder) -> None:
        self.spec = spec
        self.embedder = encoder
        self.inputs = [TensorSpec(name="text_input", dtype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="embedding", dtype="FP32", shape=[-1, encoder.dim])]

    @classmethod
    def load(cls, spec: ModelSpec, files: HfFiles, device: torch.device, dtype: torch.dtype,
             progress: Progress) -> EncoderModel:
        config = files.config()
        tokenizer = files.tokenizer()
        progress(85, "building model")
        model = files.model(False, config, dtype).to(device).eval()
        max_len = spec.max_model_len or int(getattr(config, "max_position_embeddings", 0) or 512)
        encoder = Encoder(model, tokenizer, max_len=max_len, pooling=spec.pooling, normalize=spec.normalize,
                          name=spec.name)
        progress(95, "warming up")
        encoder.embed_blocking(["warm-up"])
        return cls(spec, encoder)

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        texts = [_text(x) for x in np.asarray(inputs["text_input"]).ravel()]
        vectors, _ = self.embedder.embed_blocking(texts)
        return {"embedding": vectors}

    def close(self) -> None:
        self.embedder.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        release_freed_memory()


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("text_input must be UTF-8 text.") from None
    return str(x)
