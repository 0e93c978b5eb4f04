"""inhouse convert on Hugging Face folders: tiny random BERT and Llama-style models built here
(no download), exported with torch.onnx, checked against PyTorch, padded into one batch the way
the server's batcher does it from the declared pad values, and served."""

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
from inhouse.core.scheduling.batching import Pending, TensorLayout
from inhouse.core.spec import load_spec_file
from inhouse.errors import ConversionError
from inhouse.tools.convert import ConvertOptions, convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
runner = CliRunner()


def _bert_classifier(encoder_dir: Path, out_dir: Path) -> tuple[Any, Any]:
    """A BertForSequenceClassification (takes token_type_ids; random 3-label head) made from the
    session's tiny BERT folder, saved with its tokenizer."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(str(encoder_dir), num_labels=3).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(encoder_dir))
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model, tok


def _enable_batching(model_dir: Path, size: int) -> None:
    """What a user adds by hand to batch requests (the converter declared the padding)."""
    path = model_dir / "model.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["batching"] = {"max_batch_size": size, "max_queue_delay_ms": 5000}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _through_the_batcher(model_dir: Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Join the requests into one padded batch as the server's batcher does (from model.yaml's
    declared padding), run the converted model once on it, and split the outputs back."""
    import onnxruntime as ort

    spec = load_spec_file(model_dir)
    layout = TensorLayout(spec.name, spec.inputs, spec.outputs, batching=True)
    pending = []
    for feed in feeds:
        rows, key = layout.rows_and_key(feed, None)
        pending.append(Pending(feed, None, rows, key, 0, 0.0, None))
    assert len({p.key for p in pending}) == 1  # different lengths may share a batch
    batch, lengths = layout.join(pending)
    assert len({f["input_ids"].shape[1] for f in feeds}) == len(feeds) and lengths  # it really padded
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, batch), strict=True))
    return layout.split(pending, out, lengths)


def test_bert_classifier_folder_converts_pads_batches_and_matches(tmp_path: Path,
                                                                  llm_models: dict[str, Path]) -> None:
    model, tok = _bert_classifier(llm_models["bert"], tmp_path / "tiny-bert-clf")
    out = tmp_path / "repo" / "bert-clf"
    res = runner.invoke(app, ["convert", str(tmp_path / "tiny-bert-clf"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    diff = float(re.search(r"verified against huggingface: max abs diff (\S+)", res.output).group(1))
    assert diff < 1e-4
    assert "exported as text-classification (AutoModelForSequenceClassification)" in res.output
    print(f"BERT classifier: ONNX vs PyTorch max abs diff {diff:.3g}")
    spec = yaml.safe_load((out / "model.yaml").read_text())
    assert spec["inputs"] == [
        {"name": "input_ids", "dtype": "INT64", "shape": [-1, -1], "pad_value": tok.pad_token_id},
        {"name": "attention_mask", "dtype": "INT64", "shape": [-1, -1], "pad_value": 0},
        {"name": "token_type_ids", "dtype": "INT64", "shape": [-1, -1], "pad_value": 0},
    ]
    assert spec["outputs"] == [{"name": "logits", "dtype": "FP32", "shape": [-1, 3]}]
    assert (out / "1" / "tokenizer.json").is_file() and (out / "1" / "config.json").is_file()

    texts = ["hello world", "the weather in Paris is hot today", "a question about the temperature in Tokyo"]
    feeds = []
    for text in texts:
        enc = tok(text, return_tensors="np")
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    expected = []
    for feed in feeds:
        with torch.no_grad():
            expected.append(model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy())
    for got, want in zip(_through_the_batcher(out, feeds), expected, strict=True):
        np.testing.assert_allclose(got["logits"], want, atol=1e-4)
    _enable_batching(out, 3)
    with run_server(out.parent) as srv, InhouseClient(srv.url) as c, ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda f: c.infer("bert-clf", f)[0]["logits"], feeds))
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_llama_style_causal_lm_logits_for_every_position(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    """The TorchScript-based exporter (--exporter legacy): seconds instead of the dynamo
    exporter's half minute for this model."""
    src = llm_models["llama"]
    result = convert(src, ConvertOptions(out=tmp_path / "repo" / "llama", exporter="legacy"))
    assert result.framework == "huggingface" and result.opset == 18
    assert result.comparison is not None and result.comparison.max_abs_diff < 1e-3
    print(f"Llama-style LM: ONNX vs PyTorch max abs diff {result.comparison.max_abs_diff:.3g}")
    assert [t["name"] for t in result.inputs] == ["input_ids", "attention_mask"]  # no token_type_ids
    config = json.loads((src / "config.json").read_text())
    assert result.inputs[0]["pad_value"] == config["pad_token_id"]
    assert result.outputs == [{"name": "logits", "dtype": "FP32", "shape": [-1, -1, config["vocab_size"]]}]

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    rng = np.random.default_rng(5)
    feeds = [{"input_ids": rng.integers(0, config["vocab_size"], (1, n)), "attention_mask": np.ones((1, n), np.int64)}
             for n in (4, 9)]
    expected = []
    for feed in feeds:
        with torch.no_grad():
            expected.append(model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy())
    for got, want in zip(_through_the_batcher(tmp_path / "repo" / "llama", feeds), expected, strict=True):
        assert got["logits"].shape == want.shape  # sliced back to the request's own length
        np.testing.assert_allclose(got["logits"], want, atol=1e-3)
    with run_server(tmp_path / "repo") as srv, InhouseClient(srv.url) as c:
        got, _ = c.infer("llama", feeds[1])
    np.testing.assert_allclose(got["logits"], expected[1], atol=1e-3)


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
    with pytest.raises(ConversionError, match="dynamo exporter writes opset 18 or newer"):
        convert(unknown, ConvertOptions(out=tmp_path / "m", exporter="dynamo", opset=17))
    assert not (tmp_path / "m").exists()


@pytest.mark.slow  # building even a tiny T5 takes ~15 s on a busy 2-core machine
def test_encoder_decoder_folder_is_refused_with_advice(tmp_path: Path) -> None:
    t5 = tmp_path / "tiny-t5"  # needs decoder inputs too
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(str(t5))
    res = runner.invoke(app, ["convert", str(t5), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1 and "[1007]" in res.output and "backend: transformers" in res.output, res.output
    assert not (tmp_path / "m").exists()


@pytest.mark.slow  # the torch.export-based exporter takes ~30 s on this Llama-style model
def test_llama_style_causal_lm_with_the_dynamo_exporter(tmp_path: Path, llm_models: dict[str, Path]) -> None:
    result = convert(llm_models["llama"], ConvertOptions(out=tmp_path / "repo" / "llama"))
    assert result.comparison is not None and result.comparison.max_abs_diff < 1e-3
    print(f"Llama-style LM (dynamo): ONNX vs PyTorch max abs diff {result.comparison.max_abs_diff:.3g}")
    vocab = json.loads((llm_models["llama"] / "config.json").read_text())["vocab_size"]
    assert result.outputs == [{"name": "logits", "dtype": "FP32", "shape": [-1, -1, vocab]}]
    ids = np.random.default_rng(8).integers(0, vocab, (2, 6))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(llm_models["llama"])).eval()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    with run_server(tmp_path / "repo") as srv, InhouseClient(srv.url) as c:
        got, _ = c.infer("llama", feed)
    np.testing.assert_allclose(got["logits"], expected, atol=1e-3)
