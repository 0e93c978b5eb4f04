"""A Hugging Face model folder read into memory, for models encrypted at rest: the config,
tokenizer, chat template, generation config and safetensors weights are built from decrypted
bytes, and no plaintext is ever written to disk (not even to a temporary file).

What can be built from memory: ``config.json``; fast tokenizers (``tokenizer.json`` with
``tokenizer_config.json`` / ``special_tokens_map.json``, ``chat_template.jinja`` or
``chat_template.json``); ``generation_config.json``; ``*.safetensors`` weights (one file or
shards with ``model.safetensors.index.json``). What cannot, and is refused with the reason
instead of decrypted to a file: pickled weights (``*.bin`` / ``*.pt``: ``torch.load`` would run
pickle code from the artefact; convert to safetensors), slow-only tokenizers (a SentencePiece
``tokenizer.model`` or ``vocab.txt`` with no ``tokenizer.json``: transformers reads those only
from a path; save the tokenizer with a fast tokenizer so ``tokenizer.json`` exists) and models
with custom code (``auto_map``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inhouse.core.spec import ModelSpec
from inhouse.errors import ModelFormatError

_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
_SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# tokenizer_config.json keys that describe how to load the tokenizer, not how it behaves
_LOADER_KEYS = frozenset({"tokenizer_class", "backend", "auto_map", "tokenizer_file", "vocab_file", "merges_file",
                          "name_or_path", "processor_class"})


class MemoryFolder:
    """The files of one model folder, each read (and decrypted) only when asked for."""

    def __init__(self, source: Path, read: Callable[[Path], bytes], spec: ModelSpec) -> None:
        self.source = source
        self.spec = spec
        self._read = read
        self.names = {p.name for p in source.iterdir() if p.is_file()}

    def bytes(self, name: str) -> bytes:
        return self._read(self.source / name)

    def json(self, name: str) -> Any:
        if name not in self.names:
            return None
        data = self.bytes(name)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelFormatError(f"Model '{self.spec.name}': {name} is not valid JSON ({err}).") from None

    def refuse(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"Model '{self.spec.name}' is encrypted, and {what}")


def load_config(folder: MemoryFolder) -> Any:
    from transformers import CONFIG_MAPPING

    doc = folder.json("config.json")
    if not isinstance(doc, dict):
        raise ModelFormatError(f"Model '{folder.spec.name}': config.json is missing or not a JSON object.")
    if doc.get("auto_map"):
        raise folder.refuse("it needs custom model code (auto_map), which inhouse does not run.")
    model_type = doc.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelFormatError(f"Model '{folder.spec.name}': config.json has unknown model_type {model_type!r}.")
    return CONFIG_MAPPING[model_type].from_dict(doc)


def load_generation_config(folder: MemoryFolder) -> Any:
    from transformers import GenerationConfig

    doc = folder.json("generation_config.json")
    return GenerationConfig.from_dict(doc) if isinstance(doc, dict) else None


def _chat_template(folder: MemoryFolder, tok_config: dict[str, Any]) -> str | None:
    if "chat_template.jinja" in folder.names:
        return folder.bytes("chat_template.jinja").decode("utf-8")
    doc = folder.json("chat_template.json")
    if isinstance(doc, dict) and isinstance(doc.get("chat_template"), str):
        return str(doc["chat_template"])
    value = tok_config.get("chat_template")
    return value if isinstance(value, str) else None


def load_tokenizer(folder: MemoryFolder) -> Any:
    """A fast tokenizer built from ``tokenizer.json`` as it is (the serialised tokenizer, with
    its normaliser, pre-tokeniser, post-processor and added tokens), configured by
    ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer_class: Any = PreTrainedTokenizerFast

    if "tokenizer.json" not in folder.names:
        slow = sorted(folder.names.intersection(_SLOW_TOKENIZER_FILES))
        raise folder.refuse(
            f"its tokenizer has no tokenizer.json (only {', '.join(slow) or 'no tokenizer files'}); transformers "
            "reads slow tokenizers only from files. Save the tokenizer with a fast tokenizer "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(...) writes tokenizer.json), then encrypt again.")
    text = folder.bytes("tokenizer.json").decode("utf-8", "replace")
    try:
        backend = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises plain Exception on a malformed file
        raise ModelFormatError(f"Model '{folder.spec.name}': tokenizer.json cannot be read: {err}") from None
    config = folder.json("tokenizer_config.json") or {}
    if not isinstance(config, dict):
        raise ModelFormatError(f"Model '{folder.spec.name}': tokenizer_config.json is not a JSON object.")
    if config.get("auto_map"):
        raise folder.refuse("its tokenizer needs custom code (auto_map), which inhouse does not run.")
    specials = folder.json("special_tokens_map.json") or {}
    kwargs: dict[str, Any] = {k: v for k, v in config.items() if k not in _LOADER_KEYS}
    if isinstance(specials, dict):
        kwargs.update({k: v for k, v in specials.items() if k not in kwargs})
    decoder = kwargs.pop("added_tokens_decoder", None)
    if isinstance(decoder, dict):
        kwargs["added_tokens_decoder"] = {int(k): AddedToken(**v) for k, v in decoder.items() if isinstance(v, dict)}
    for key, value in list(kwargs.items()):
        if isinstance(value, dict) and "content" in value:  # a special token saved as an AddedToken
            kwargs[key] = AddedToken(**value)
    kwargs["chat_template"] = _chat_template(folder, config)
    try:
        return tokenizer_class(tokenizer_object=backend, **kwargs)
    except Exception as err:
        raise ModelFormatError(f"Model '{folder.spec.name}': cannot build the tokenizer: {err}") from None


def load_state_dict(folder: MemoryFolder) -> dict[str, Any]:
    """The weights, from safetensors bytes (shard by shard, each freed once copied into tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    index = folder.json("model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        shards = sorted(set(index["weight_map"].values()))
    elif "model.safetensors" in folder.names:
        shards = ["model.safetensors"]
    else:
        pickled = sorted(n for n in folder.names if n.endswith(_PICKLED))
        if pickled:
            raise folder.refuse(
                f"its weights are pickled ({', '.join(pickled)}); loading them from memory would run pickle code "
                "from the file. Save them as safetensors (save_pretrained(..., safe_serialization=True)), then "
                "encrypt again.")
        raise ModelFormatError(f"Model '{folder.spec.name}': no safetensors weights in {folder.source}.")
    state: dict[str, Any] = {}
    for shard in shards:
        if shard not in folder.names:
            raise ModelFormatError(f"Model '{folder.spec.name}': weight shard {shard} is missing.")
        data = folder.bytes(shard)
        try:
            state.update(load_safetensors(data))
        except SafetensorError as err:
            raise ModelFormatError(f"Model '{folder.spec.name}': {shard} is not a valid safetensors file: "
                                   f"{err}") from None
        del data
    return state


def load_model(folder: MemoryFolder, causal_lm: bool, config: Any, dtype: Any) -> Any:
    """The model class for the config (as ``AutoModelForCausalLM`` / ``AutoModel`` pick it),
    with the in-memory weights."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if causal_lm else MODEL_MAPPING
    try:
        model_class: Any = mapping[type(config)]
    except KeyError:
        raise ModelFormatError(f"Model '{folder.spec.name}': transformers has no "
                               f"{'causal LM' if causal_lm else 'base model'} class for a "
                               f"'{config.model_type}' config.") from None
    state = load_state_dict(folder)
    try:
        return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelFormatError(f"Model '{folder.spec.name}': the weights do not fit its config: {err}") from None
