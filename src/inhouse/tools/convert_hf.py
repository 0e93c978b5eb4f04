"""Hugging Face model folders → ONNX with optimum's exporter, the one the ecosystem maintains.
optimum validates the export against the PyTorch model itself; its result is reported."""

from __future__ import annotations

import tempfile
from pathlib import Path

from inhouse.errors import ConversionError
from inhouse.tools.extras import require


def is_hf_folder(src: Path) -> bool:
    return src.is_dir() and (src / "config.json").is_file()


def export(src: Path, opset: int, task: str = "auto") -> tuple[bytes, list[Path]]:
    """(onnx bytes, tokenizer / config files to copy next to the model)."""
    require("transformers", "convert-hf")
    exporters = require("optimum.exporters.onnx", "convert-hf")
    with tempfile.TemporaryDirectory(prefix="inhouse-hf-") as tmp:
        try:
            exporters.main_export(str(src), output=tmp, task=task, opset=opset, device="cpu",
                                  do_validation=True, local_files_only=True)
        except Exception as err:
            raise ConversionError(f"optimum could not export {src}: {err}") from None
        onnx_files = sorted(Path(tmp).glob("*.onnx"))
        if len(onnx_files) != 1:
            raise ConversionError(f"optimum wrote {len(onnx_files)} ONNX files for {src} (an encoder-decoder or "
                                  "LLM); serve such models with backend: transformers instead.")
        data = onnx_files[0].read_bytes()
    side = [p for p in src.iterdir() if p.name in (
        "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
        "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")]
    return data, side
