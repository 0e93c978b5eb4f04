"""inhouse convert on Hugging Face folders: tiny random BERT and Llama-style models built here
(no download), exported with torch.onnx, checked against PyTorch, then served with the
batcher padding requests of different lengths into one batch."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import run_server
from inhouse.cli import app
from inhouse.client import InhouseClient
from inhouse.errors import ConversionError
from inhouse.tools.convert import ConvertOptions, convert
from llm_fixtures import build_causal_lm, build_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
runner = CliRunner()


def _bert_classifier(out_dir: Path) -> Any:
    """A tiny random BertForSequenceClassification (takes token_type_ids) with its tokenizer."""
    out_dir.mkdir(parents=True)
    tok = build_tokenizer(out_dir, vocab_size=300, encoder=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=3,
                                     pad_token_id=tok.pad_token_id)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(str(out_dir))
    return model, tok


def _enable_batching(model_dir: Path, size: int) -> None:
    """What a user adds by hand to batch requests (the converter declared the padding)."""
    path = model_dir / "model.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["batching"] = {"max_batch_size": size, "max_queue_delay_ms": 5000}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _batch_metric(url: str, model: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for kind in ("count", "sum"):
        m = re.search(rf'^inhouse_batch_size_{kind}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.M)
        values[kind] = float(m.group(1)) if m else 0.0
    return values["count"], values["sum"]


def test_bert_classifier_folder_converts_pads_batches_and_matches(tmp_path: Path) -> None:
    model, tok = _bert_classifier(tmp_path / "tiny-bert-clf")
    out = tmp_path / "repo" / "bert-clf"
    res = runner.invoke(app, ["convert", str(tmp_path / "tiny-bert-clf"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    diff = float(re.search(r"verified against huggingface: max abs diff (\S+)", res.output).group(1))
    assert diff < 1e-4
    print(f"BERT classifier: ONNX vs PyTorch max abs diff {diff:.3g}")
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["inputs"] == [
        {"name": "input_ids", "dtype": "INT64", "shape": [-1, -1], "pad_value": tok.pad_token_id},
        {"name": "attention_mask", "dtype": "INT64", "shape": [-1, -1], "pad_value": 0},
        {"name": "token_type_ids", "dtype": "INT64", "shape": [-1, -1], "pad_value": 0},
    ]
    assert spec["outputs"] == [{"name": "logits", "dtype": "FP32", "shape": [-1, 3]}]
    assert (out / "1" / "tokenizer.json").is_file() and (out / "1" / "config.json").is_file()

    _enable_batching(out, 3)
    texts = ["hello world", "the weather in Paris is hot today", "a question about the temperature in Tokyo"]
    encoded = [tok(t, return_tensors="np") for t in texts]
    assert len({e["input_ids"].shape[1] for e in encoded}) == 3  # three different lengths
    with run_server(out.parent) as srv, InhouseClient(srv.url) as c, ThreadPoolExecutor(3) as pool:
        feeds = [{"input_ids": np.asarray(e["input_ids"], dtype=np.int64),
                  "attention_mask": np.asarray(e["attention_mask"], dtype=np.int64),
                  "token_type_ids": np.zeros_like(e["input_ids"], dtype=np.int64)} for e in encoded]
        results = list(pool.map(lambda f: c.infer("bert-clf", f)[0]["logits"], feeds))
        count, total = _batch_metric(srv.url, "bert-clf")
    assert (count, total) == (1, 3)  # the three requests were padded into one batch
    for feed, got in zip(feeds, results, strict=True):
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_llama_style_causal_lm_logits_for_every_position(tmp_path: Path) -> None:
    src = build_causal_lm(tmp_path / "tiny-llama", "llama", hidden=32, layers=1, heads=2, kv_heads=1, max_len=128)
    result = convert(src, ConvertOptions(out=tmp_path / "repo" / "llama"))
    assert result.framework == "huggingface"
    assert result.comparison is not None and result.comparison.max_abs_diff < 1e-3
    print(f"Llama-style LM: ONNX vs PyTorch max abs diff {result.comparison.max_abs_diff:.3g}")
    assert [t["name"] for t in result.inputs] == ["input_ids", "attention_mask"]  # no token_type_ids
    config = json.loads((src / "config.json").read_text())
    assert result.inputs[0]["pad_value"] == config["pad_token_id"]
    assert result.outputs == [{"name": "logits", "dtype": "FP32", "shape": [-1, -1, config["vocab_size"]]}]

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    _enable_batching(tmp_path / "repo" / "llama", 2)
    rng = np.random.default_rng(5)
    feeds = [{"input_ids": rng.integers(0, config["vocab_size"], (1, n)), "attention_mask": np.ones((1, n), np.int64)}
             for n in (4, 9)]
    with run_server(tmp_path / "repo") as srv, InhouseClient(srv.url) as c, ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda f: c.infer("llama", f)[0]["logits"], feeds))
        assert _batch_metric(srv.url, "llama") == (1, 2)
    for feed, got in zip(feeds, results, strict=True):
        assert got.shape == (1, feed["input_ids"].shape[1], config["vocab_size"])  # sliced back to its length
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_hugging_face_folders_it_cannot_convert(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    res = runner.invoke(app, ["convert", str(broken), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "[1007]" in res.output and "not readable JSON" in res.output
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    res = runner.invoke(app, ["convert", str(unknown), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "[1007]" in res.output and "transformers cannot load" in res.output
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ConversionError, match="transformers cannot load"):
        convert(no_weights, ConvertOptions(out=tmp_path / "m"))
    with pytest.raises(ConversionError, match="Unknown Hugging Face task 'summarise'"):
        convert(unknown, ConvertOptions(out=tmp_path / "m", task="summarise"))
    assert not (tmp_path / "m").exists()
