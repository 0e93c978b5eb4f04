"""``inhouse convert HF_FOLDER --to gguf``: a Hugging Face causal LM turned into a GGUF model
folder that ``backend: llamacpp`` serves as it is. The work is done by llama.cpp's own
``convert_hf_to_gguf.py`` and ``llama-quantize`` from the build that
``scripts/build_llama_server.sh`` keeps in the user's cache folder, so the file matches the
``llama-server`` that will read it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inhouse.core.spec import find_spec_file
from inhouse.errors import ConversionError, MissingExtraError, ModelFormatError

BUILD_HINT = "bash scripts/build_llama_server.sh"
LLAMA_CPP_VERSION = "0.3.36"  # the same pin as backends/llamacpp.py and the build script
QUANTS = ("f16", "q8_0", "q4_k_m")
FILENAME = "model.gguf"
_CONVERTER_TYPES = {"f16": "f16", "q8_0": "q8_0", "q4_k_m": "f16"}  # q4_k_m: f16 first, then llama-quantize
_PRE_NAME = re.compile(r'res = "([^"]+)"')

# Runs the converter with its own gguf-py first on the path; with a pre-tokenizer name, that name
# replaces the converter's recognition by hash (a tokenizer trained in-house has no known hash).
_BOOT = """\
import runpy, sys
convert_dir, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [convert_dir + '/gguf-py', convert_dir]
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [convert_dir + '/convert_hf_to_gguf.py', *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""

Step = Callable[[str], None]


@dataclass
class GgufResult:
    model_dir: Path
    version: int
    artefact: Path
    quant: str
    size: int


@dataclass
class LlamaCppTools:
    convert_dir: Path  # holds convert_hf_to_gguf.py, conversion/ and gguf-py/
    quantize: Path


def find_tools(llama_server: str | None = None) -> LlamaCppTools:
    """The converter and ``llama-quantize`` of one llama.cpp build: beside the ``llama_server``
    binary when it is named (the build script's layout: BIN/llama-server, BIN/llama-quantize,
    BIN/../convert/), else in the build script's cache folder."""
    roots: list[Path] = []
    named = llama_server or os.environ.get("INHOUSE_LLAMA_SERVER")
    if named:
        roots.append(Path(named).expanduser().resolve().parent.parent)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    roots.append(cache / "inhouse" / f"llama.cpp-{LLAMA_CPP_VERSION}")
    for root in roots:
        convert_dir, quantize = root / "convert", root / "bin" / "llama-quantize"
        if (convert_dir / "convert_hf_to_gguf.py").is_file() and quantize.is_file() and os.access(quantize, os.X_OK):
            return LlamaCppTools(convert_dir, quantize)
    looked = ", ".join(str(r) for r in roots)
    raise MissingExtraError(f"Converting to GGUF needs llama.cpp's convert_hf_to_gguf.py and llama-quantize, which "
                            f"were not found (looked in {looked}); build them with '{BUILD_HINT}'.")


def known_pre_tokenizers(tools: LlamaCppTools) -> set[str]:
    """The pre-tokenizer names this converter writes (and so this llama.cpp reads)."""
    base = tools.convert_dir / "conversion" / "base.py"
    try:
        return set(_PRE_NAME.findall(base.read_text(encoding="utf-8")))
    except OSError:
        return set()


def _check_source(src: Path) -> dict[str, Any]:
    import json

    if not src.is_dir() or not (src / "config.json").is_file():
        raise ModelFormatError(f"{src} is not a Hugging Face model folder (no config.json); --to gguf converts a "
                               "folder saved with save_pretrained (config.json, weights, tokenizer).")
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelFormatError(f"{src / 'config.json'} is not readable JSON: {err}") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ModelFormatError(f"{src / 'config.json'} names no 'architectures'; the GGUF converter picks the "
                               "model family from it.")
    if not any(src.glob("*.safetensors")) and not any(src.glob("*.bin")):
        raise ModelFormatError(f"{src} holds no weights (*.safetensors or *.bin).")
    return config


def _failure(stderr: str, config: dict[str, Any], pre_names: set[str]) -> ModelFormatError | ConversionError:
    tail = " | ".join(line for line in stderr.strip().splitlines()[-4:] if line.strip())
    arch = ", ".join(config.get("architectures") or [])
    if "BPE pre-tokenizer was not recognized" in stderr:
        hint = ", ".join(sorted(n for n in pre_names if n in ("gpt-2", "llama-bpe", "qwen2", "deepseek-llm")))
        return ConversionError("llama.cpp's converter does not recognise this model's tokenizer (a tokenizer it "
                               "has no record of, e.g. one trained in-house). Name its pre-tokenizer with "
                               f"--tokenizer-pre (e.g. {hint or 'gpt-2'}).")
    if "is not supported" in stderr or "not supported!" in stderr:
        return ModelFormatError(f"llama.cpp's converter does not support the architecture {arch}: {tail}")
    return ConversionError(f"llama.cpp's converter failed for {arch}: {tail}")


def _run(cmd: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConversionError(f"{what} did not finish within {timeout_s:.0f} s.") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert_to_gguf(src: Path, out: Path, quant: str = "f16", *, tokenizer_pre: str | None = None,
                    llama_server: str | None = None, step: Step = lambda _: None,
                    timeout_s: float = 3600.0) -> GgufResult:
    """Write ``out/VERSION/model.gguf`` (the next free version) and create or update ``out/model.yaml``
    (``backend: llamacpp``, ``task: chat``, the file's sha256); keys a user wrote are kept."""
    quant = quant.lower()
    if quant not in QUANTS:
        raise ConversionError(f"--quant must be one of {', '.join(QUANTS)}, not '{quant}'.")
    config = _check_source(src)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; give the model folder to write (REPO/NAME).")
    tools = find_tools(llama_server)
    pre_names = known_pre_tokenizers(tools)
    if tokenizer_pre is not None and pre_names and tokenizer_pre not in pre_names:
        raise ConversionError(f"--tokenizer-pre '{tokenizer_pre}' is not a pre-tokenizer this llama.cpp knows; "
                              f"e.g. gpt-2, llama-bpe or qwen2.")
    created = not out.exists()
    try:
        return _write(src, out, quant, tokenizer_pre, tools, config, pre_names, step, timeout_s)
    except BaseException:
        if created:  # a failed conversion leaves no empty model folder in the repository
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write(src: Path, out: Path, quant: str, tokenizer_pre: str | None, tools: LlamaCppTools,
           config: dict[str, Any], pre_names: set[str], step: Step, timeout_s: float) -> GgufResult:
    try:
        out.mkdir(parents=True, exist_ok=True)
        version = max((int(p.name) for p in out.iterdir() if p.is_dir() and p.name.isdigit()), default=0) + 1
        vdir = out / str(version)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out) as work:
            first = Path(work) / f"model-{_CONVERTER_TYPES[quant]}.gguf"
            step(f"converting {src.name} to GGUF ({_CONVERTER_TYPES[quant]}) with llama.cpp's converter")
            proc = _run([sys.executable, "-c", _BOOT, str(tools.convert_dir), tokenizer_pre or "", str(src),
                         "--outtype", _CONVERTER_TYPES[quant], "--outfile", str(first)], "The converter", timeout_s)
            if proc.returncode != 0 or not first.is_file():
                raise _failure(proc.stderr, config, pre_names)
            made = first
            if quant == "q4_k_m":
                step("quantizing to Q4_K_M with llama-quantize")
                made = Path(work) / "model-q4_k_m.gguf"
                proc = _run([str(tools.quantize), str(first), str(made), "Q4_K_M"], "llama-quantize", timeout_s)
                if proc.returncode != 0 or not made.is_file():
                    tail = " | ".join(proc.stdout.strip().splitlines()[-3:] + proc.stderr.strip().splitlines()[-3:])
                    raise ConversionError(f"llama-quantize failed: {tail}")
            vdir.mkdir(parents=True, exist_ok=True)
            artefact = vdir / FILENAME
            made.replace(artefact)
        step(f"writing {out / 'model.yaml'}")
        spec_path = find_spec_file(out) or out / "model.yaml"
        doc = (yaml.safe_load(spec_path.read_text(encoding="utf-8")) if spec_path.is_file() else None) or {}
        if not isinstance(doc, dict):
            raise ConversionError(f"{spec_path} must be a mapping of keys to values.")
        doc.setdefault("name", out.name)
        doc["backend"] = "llamacpp"
        doc.setdefault("task", "chat")
        sha = doc.setdefault("files", {}).setdefault("sha256", {})
        sha[f"{version}/{FILENAME}"] = _sha256(artefact)
        spec_path.write_text(yaml.safe_dump(doc, sort_keys=False, width=100), encoding="utf-8")
    except yaml.YAMLError as err:
        raise ConversionError(f"{out}'s model.yaml is not valid YAML: {err}") from None
    except OSError as err:
        raise ConversionError(f"Cannot write the model to {out}: {err.strerror or err}. --out must be a folder "
                              "you can write to (REPO/NAME).") from None
    return GgufResult(out, version, artefact, quant, artefact.stat().st_size)
