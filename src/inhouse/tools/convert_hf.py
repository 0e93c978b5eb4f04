"""Hugging Face model folders → ONNX: the model transformers loads from the folder, exported
with ``torch.onnx.export`` (dynamic batch and sequence axes on ``input_ids``,
``attention_mask`` and, where the model takes it, ``token_type_ids``), then checked against
PyTorch on padded batches of other shapes.

optimum-onnx, the ecosystem's exporter, pins transformers < 4.58 and cannot be installed
beside the transformers 5 that ``[llm]`` serves with; torch.onnx is the exporter PyTorch
itself maintains."""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inhouse.errors import ConversionError
from inhouse.tools import convert_torch
from inhouse.tools.extras import require
from inhouse.tools.samples import load_npz
from inhouse.tools.verify import Comparison, compare, run, session

log = logging.getLogger(__name__)

# --task → the transformers auto class that loads the folder for it
TASKS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
}
# architecture class name suffix → task, for --task auto
_ARCH_SUFFIXES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# outputs that are internal state, not results to serve
_SKIP_OUTPUTS = {"past_key_values", "hidden_states", "attentions", "cross_attentions", "loss"}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.txt", "merges.txt", "vocab.json", "added_tokens.json",
              "chat_template.jinja", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


@dataclass
class HFExport:
    onnx_bytes: bytes
    task: str
    input_names: list[str]
    output_names: list[str]
    pad_values: dict[str, int]  # input name → the value the batcher pads it with
    comparison: Comparison | None
    side_files: list[Path] = field(default_factory=list)


def is_hf_folder(src: Path) -> bool:
    return src.is_dir() and (src / "config.json").is_file()


def _read_config(src: Path) -> dict[str, Any]:
    try:
        doc = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{src / 'config.json'} is not readable JSON: {err}") from None
    if not isinstance(doc, dict):
        raise ConversionError(f"{src / 'config.json'} must hold a JSON object.")
    return doc


def resolve_task(config: dict[str, Any], task: str) -> str:
    """The export task: ``task`` itself, or (for 'auto') the one the folder's architecture names."""
    if task != "auto":
        if task not in TASKS:
            raise ConversionError(f"Unknown Hugging Face task '{task}'; choose auto or one of {', '.join(TASKS)}.")
        return task
    for arch in config.get("architectures") or []:
        for suffix, name in _ARCH_SUFFIXES:
            if isinstance(arch, str) and arch.endswith(suffix):
                return name
    return "feature-extraction"


def _load(src: Path, task: str) -> Any:
    transformers = require("transformers", "convert-hf")
    auto = getattr(transformers, TASKS[task])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_pretrained(str(src), local_files_only=True, attn_implementation="eager")
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"transformers cannot load {src} as {TASKS[task]} (task {task}): {first}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # one forward pass over the whole sequence, no KV cache outputs
    return model.eval()


def _input_names(model: Any) -> list[str]:
    params = inspect.signature(model.forward).parameters
    names = [n for n in TEXT_INPUTS if n in params]
    if "input_ids" not in names:
        raise ConversionError(f"{type(model).__name__} does not take input_ids; only text models (token ids in, "
                              "tensors out) convert from a Hugging Face folder.")
    if "token_type_ids" in names and int(getattr(model.config, "type_vocab_size", 0) or 0) < 1:
        names.remove("token_type_ids")
    return names


def _pad_token_id(src: Path, model: Any) -> int:
    """The id the batcher pads ``input_ids`` with: the model's pad token, else the tokenizer's,
    else 0 (any id works where the attention mask hides it)."""
    pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    transformers = require("transformers", "convert-hf")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pad = transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True).pad_token_id
    except Exception as err:  # no tokenizer in the folder: fine, the ids come from elsewhere
        log.debug("no tokenizer in %s: %s", src, err)
        return 0
    return pad if isinstance(pad, int) else 0


def sample_batch(rng: np.random.Generator, names: list[str], batch: int, seq: int, vocab: int,
                 pad_id: int, ragged: bool) -> dict[str, np.ndarray]:
    """Token ids with an attention mask; with ``ragged`` the rows are right-padded to different
    lengths, as the batcher pads them."""
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    if ragged:
        for row in range(1, batch):
            length = max(1, seq - (row * seq) // (batch + 1))
            mask[row, length:] = 0
            ids[row, length:] = pad_id
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}
    return {n: out[n] for n in names}


def _wrapper(torch: Any, model: Any, names: list[str], sample: dict[str, np.ndarray]) -> Any:
    """A module taking the text inputs positionally and returning the served outputs (found by
    one eager call on ``sample``) as a tuple."""
    with torch.no_grad():
        out = model(**{n: torch.from_numpy(v) for n, v in sample.items()}, return_dict=True)
    keys = [k for k, v in out.items() if k not in _SKIP_OUTPUTS and isinstance(v, torch.Tensor)]
    if not keys:
        raise ConversionError(f"{type(model).__name__} returns no tensor outputs to serve.")

    class TextModel(torch.nn.Module):  # type: ignore[misc]
        output_names = keys

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = self.model(**{n: given[n] for n in names}, return_dict=True)
            return tuple(out[k] for k in keys)

    return TextModel().eval()


def _run(torch: Any, module: Any, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        values = module(*(torch.from_numpy(v) for v in sample.values()))
    return {n: v.detach().cpu().numpy() for n, v in zip(module.output_names, values, strict=True)}


def export(src: Path, opset: int, task: str = "auto", *, exporter: str = "auto", verify: bool = True,
           samples: Path | None = None) -> HFExport:
    """Export the folder's model for ``task`` ('auto': the one its architecture names) and, with
    ``verify``, compare it with PyTorch on ``samples`` (.npz keyed by input name) or on random
    right-padded token ids."""
    torch = require("torch", "convert-hf")
    require("transformers", "convert-hf")
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and opset >= convert_torch.DYNAMO_OPSET)
    if use_dynamo and opset < convert_torch.DYNAMO_OPSET:
        raise ConversionError(f"The dynamo exporter writes opset {convert_torch.DYNAMO_OPSET} or newer; choose "
                              f"--opset {convert_torch.DYNAMO_OPSET}+ or --exporter legacy.")
    config = _read_config(src)
    task = resolve_task(config, task)
    model = _load(src, task)
    names = _input_names(model)
    pad_id = _pad_token_id(src, model)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise ConversionError(f"{src / 'config.json'} gives no vocab_size; cannot make sample token ids.")
    rng = np.random.default_rng(0)
    trace = sample_batch(rng, names, 2, 8, vocab, pad_id, ragged=False)
    try:
        module = _wrapper(torch, model, names, trace)
        reference = _run(torch, module, trace)
    except ConversionError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(
            f"{type(model).__name__} fails on sample token ids of shape [2, 8] ({first}). Only models that take "
            "token ids alone convert from a folder; serve encoder-decoders and others with backend: transformers."
        ) from None
    out_names = list(module.output_names)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    for name, value in reference.items():
        axes[name] = {0: "batch", 1: "sequence"} if value.ndim >= 3 else {0: "batch"}
    onnx_bytes = convert_torch.export_module(module, [torch.from_numpy(v) for v in trace.values()], names,
                                             out_names, axes, opset, use_dynamo)
    comparison = None
    if verify:
        comparison = _verify(torch, module, onnx_bytes, names, vocab, pad_id, samples)
    side = [p for p in src.iterdir() if p.name in SIDE_FILES and p.is_file()]
    return HFExport(onnx_bytes, task, names, out_names, {"input_ids": pad_id, "attention_mask": 0,
                                                         "token_type_ids": 0}, comparison, side)


def _verify(torch: Any, module: Any, onnx_bytes: bytes, names: list[str], vocab: int, pad_id: int,
            samples: Path | None) -> Comparison:
    """ONNX against PyTorch on padded batches of shapes other than the traced [2, 8]."""
    rng = np.random.default_rng(1)
    if samples is not None:
        sets = [{n: np.asarray(v, dtype=np.int64) for n, v in load_npz(samples, names).items()}]
    else:
        sets = [sample_batch(rng, names, 3, 13, vocab, pad_id, ragged=True),
                sample_batch(rng, names, 1, 5, vocab, pad_id, ragged=False)]
    sess = session(onnx_bytes)
    rows: dict[str, Any] = {}
    for sample in sets:
        try:
            ref = _run(torch, module, sample)
        except Exception as err:
            raise ConversionError(f"PyTorch fails on the sample inputs: {err}") from None
        got = run(sess, sample)
        if "attention_mask" in sample:  # padded positions carry no meaning: compare the real tokens only
            keep = sample["attention_mask"].astype(bool)
            for name, value in ref.items():
                if value.ndim >= 3 and value.shape[:2] == keep.shape:
                    ref[name], got[name] = value[keep], got[name][keep]
        for o in compare(ref, got).outputs:
            cur = rows.get(o.name)
            if cur is None or (o.max_abs_diff or 0.0) > (cur.max_abs_diff or 0.0):
                rows[o.name] = o
    return Comparison(list(rows.values()))
