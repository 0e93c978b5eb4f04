"""A tiny random vision-language model — SmolVLM / Idefics3: a SigLIP-style vision tower, a pixel
shuffle connector and a Llama text model — with the LLM fixtures' trained tokenizer, converted
to a GGUF text model and a GGUF projector (``--mmproj``) by llama.cpp's own converter. Also
PNG images written here (no Pillow needed). No download."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

from llm_fixtures import build_tokenizer


def png(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def build_vlm(out_dir: Path, seed: int = 0) -> Path:
    """The HF folder: 64×64 images in 16×16 patches, 4 image tokens after the pixel shuffle."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    tok.add_tokens(["\n\n"])  # llama.cpp's Idefics3 image wrapper looks these up as whole tokens
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>"]})
    tok.save_pretrained(str(out_dir))
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<image>")}
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=16, initializer_range=0.2)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(Idefics3Config(
        text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids["<image>"],
        tie_word_embeddings=False)).eval()
    model.save_pretrained(str(out_dir))
    # what Idefics3ImageProcessor would save (it needs Pillow and torchvision to be built)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_resize": True, "size": {"longest_edge": 64},
        "max_image_size": {"longest_edge": 64}, "do_image_splitting": False, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255}))
    # Idefics3Processor's count of tokens per image (vLLM's processor reads it): 16 patches / 2²
    (out_dir / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                               "image_seq_len": 4}))
    return out_dir


def convert_vlm(hf: Path, out_dir: Path, convert_dir: Path) -> tuple[Path, Path]:
    """(text model, projector) as f16 GGUF. This converter registers Idefics3 only for the
    projector, so the text model is converted from a copy labelled as a Llava model (the Llama
    text model under ``text_config``, vision tensors skipped)."""
    from inhouse.tools.convert_gguf import _BOOT

    text_src = Path(shutil.copytree(hf, out_dir / "hf-text"))
    config = json.loads((text_src / "config.json").read_text())
    (text_src / "config.json").write_text(json.dumps({**config, "architectures": ["LlavaForConditionalGeneration"]}))
    made = []
    for src, name, extra in ((text_src, "model.gguf", []), (hf, "mmproj.gguf", ["--mmproj"])):
        out = out_dir / name
        proc = subprocess.run([sys.executable, "-c", _BOOT, str(convert_dir), "gpt-2", str(src), "--outtype", "f16",
                               *extra, "--outfile", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        made.append(out)
    return made[0], made[1]
