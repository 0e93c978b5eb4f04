"""The deployment guides' ``model_spec.yaml`` (format, engine as a name, version label, numpy
dtypes, named dimensions, resources) loads as written, and each of those fields does what it
says: a real server, a real ONNX model, httpx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from conftest import RunningServer, run_server
from inhouse.core.spec import load_spec_file, parse_memory, parse_spec
from inhouse.errors import ModelSpecError
from models import _model

GUIDE = """\
name: "finance-bert-v1"
version: "1.0.0"
format: "ONNX"
engine: "onnxruntime"
inputs:
- {name: "input_ids", dtype: "int64", shape: ["batch", "sequence"]}
- {name: "attention_mask", dtype: "int64", shape: ["batch", "sequence"]}
outputs:
- {name: "logits", dtype: "float32", shape: ["batch", "labels"]}
resources: {cpu: 2, memory: "8Gi", gpu: 1}
"""
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def bert_like_model() -> bytes:
    """logits[b] = [s, -s] with s = sum(input_ids * attention_mask) over the sequence."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis"),
             numpy_helper.from_array(np.array([[1.0, -1.0]], np.float32), "w")]
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
        helper.make_node("Cast", ["masked"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f", "axis"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "w"], ["logits"]),
    ]
    return _model(helper.make_graph(nodes, "bert_like", [ids, mask], [logits], initializer=inits))


def write_guide_model(root: Path, text: str = GUIDE, name: str = "finance-bert-v1") -> Path:
    mdir = root / name
    (mdir / "1").mkdir(parents=True)
    (mdir / "1" / "model.onnx").write_bytes(bert_like_model())
    (mdir / "model_spec.yaml").write_text(text.replace('"finance-bert-v1"', f'"{name}"'))
    return mdir


def servable(text: str = GUIDE) -> str:
    """The guide's file made to fit a test machine: 8Gi need not be free on a CI runner, and a
    machine without a GPU needs the CPU fallback allowed (the guide's gpu: 1 otherwise fails)."""
    fallback = "" if HAS_CUDA else ", allow_cpu_fallback: true"
    return text.replace('memory: "8Gi", gpu: 1}', f'memory: "64Mi", gpu: 1{fallback}}}')


def _expect(r: httpx.Response, status: int, code: int, *fragments: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["inhouse-error-code"] == str(code), r.headers
    msg: str = r.json()["error"]
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def _request(ids: list[list[int]], mask: list[list[int]]) -> dict[str, Any]:
    def tensor(name: str, rows: list[list[int]]) -> dict[str, Any]:
        return {"name": name, "datatype": "INT64", "shape": [len(rows), len(rows[0])],
                "data": [v for row in rows for v in row]}
    return {"inputs": [tensor("input_ids", ids), tensor("attention_mask", mask)]}


# ---- the file as written ---------------------------------------------------------------

def test_guide_file_parses_as_written(tmp_path: Path) -> None:
    spec = load_spec_file(write_guide_model(tmp_path))
    assert spec.backend == "onnxruntime" and spec.version == "1.0.0"
    assert [(t.dtype, t.shape, t.dim_names) for t in spec.inputs or []] == [
        ("INT64", [-1, -1], ["batch", "sequence"])] * 2
    assert spec.outputs is not None and spec.outputs[0].dtype == "FP32" and spec.outputs[0].shape == [-1, -1]
    assert spec.resources.memory == 8 * 2**30 and spec.resources.gpu == 1
    assert spec.onnxruntime.intra_op_threads == 2  # cpu: 2
    assert spec.instances.device == "cuda"  # gpu: 1, no fallback written


@pytest.fixture
def guide_server(tmp_path: Path) -> Iterator[RunningServer]:
    root = tmp_path / "models"
    write_guide_model(root, servable())
    with run_server(root) as srv:
        yield srv


def test_guide_model_serves(guide_server: RunningServer) -> None:
    with guide_server.client() as c:
        meta = c.get("/v2/models/finance-bert-v1").json()
        assert meta["parameters"] == {"version": "1.0.0"}  # the label, beside the numbered versions
        assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                                  {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1]}]
        cfg = c.get("/v2/models/finance-bert-v1/config").json()
        assert cfg["version"] == 1 and cfg["version_label"] == "1.0.0"
        assert cfg["onnxruntime"]["intra_op_threads"] == 2 and cfg["resources"]["memory"] == 64 * 2**20
        r = c.post("/v2/models/finance-bert-v1/infer", json=_request([[1, 2, 3], [4, 5, 6]], [[1, 1, 0], [1, 1, 1]]))
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "logits" and out["shape"] == [2, 2] and out["data"] == [3, -3, 15, -15]


def test_named_dimensions_must_agree_within_a_request(guide_server: RunningServer) -> None:
    with guide_server.client() as c:
        url = "/v2/models/finance-bert-v1/infer"
        _expect(c.post(url, json=_request([[1, 2, 3]], [[1, 1, 1, 1]])), 400, 2005,
                "Dimension 'sequence'", "3 in input 'input_ids'", "4 in input 'attention_mask'")
        _expect(c.post(url, json=_request([[1, 2], [3, 4]], [[1, 1]])), 400, 2005, "Dimension 'batch'")
        # other lengths are fine as long as both inputs agree: the names are dynamic
        assert c.post(url, json=_request([[1] * 7], [[1] * 7])).status_code == 200


def test_cpu_sets_onnxruntime_threads(tmp_path: Path) -> None:
    mdir = write_guide_model(tmp_path / "models", servable())
    from inhouse.backends import LoadContext
    from inhouse.backends.onnx import OnnxBackend

    spec = load_spec_file(mdir)
    model = OnnxBackend().load(LoadContext(model_dir=mdir, version_dir=mdir / "1", spec=spec))
    try:
        assert model.session.get_session_options().intra_op_num_threads == 2
    finally:
        model.close()


# ---- each field, and what it refuses ------------------------------------------------------

def _parse(text: str) -> Any:
    return parse_spec(yaml.safe_load(text), "model_spec.yaml")


def test_fields_map_to_inhouse_settings() -> None:
    base = servable().replace('format: "ONNX"\nengine: "onnxruntime"\n', "")
    assert _parse(base.replace('version: "1.0.0"', "version: 3")).version == "3"
    assert _parse('name: m\nformat: onnx\n').backend == "onnxruntime"
    assert _parse('name: m\nformat: pytorch\n').backend == "transformers"
    assert _parse('name: m\nengine: transformers\nbackend: transformers\n').backend == "transformers"
    assert _parse('name: m\nbackend: transformers\nengine: {max_num_seqs: 4}\n').engine.max_num_seqs == 4
    # an explicit thread count wins over resources.cpu; millicores round to at least one thread
    explicit = _parse("name: m\nresources: {cpu: 4}\nonnxruntime: {intra_op_threads: 1}\n")
    assert explicit.onnxruntime.intra_op_threads == 1
    assert _parse('name: m\nresources: {cpu: "500m"}\n').onnxruntime.intra_op_threads == 1
    assert _parse("name: m\nresources: {gpu: 1, allow_cpu_fallback: true}\n").instances.device == "auto"
    assert _parse("name: m\n").instances.device == "cpu"
    dtypes = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "string")
    spec = _parse("name: m\ninputs:\n" + "".join(f"- {{name: t{i}, dtype: {d}, shape: [-1]}}\n"
                                                  for i, d in enumerate(dtypes)))
    assert [t.dtype for t in spec.inputs or []] == ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64",
                                                    "FP16", "FP32", "FP64", "BYTES"]
    assert [parse_memory(v) for v in ("8Gi", "512Mi", "4Ki", "2G", "3M", "1K", 1024, "1.5Gi")] == [
        8 * 2**30, 512 * 2**20, 4096, 2 * 10**9, 3 * 10**6, 1000, 1024, 3 * 2**29]


@pytest.mark.parametrize(("text", "fragments"), [
    (GUIDE.replace("resources:", "resorces:"), ["resorces: unknown key", "did you mean 'resources'?"]),
    (GUIDE.replace("version:", "verison:"), ["verison: unknown key", "did you mean 'version"]),
    (GUIDE + "backend: transformers\n", ["contradicts", "transformers", "onnxruntime"]),
    (GUIDE.replace('engine: "onnxruntime"', 'engine: "transformers"'), ["contradicts"]),
    (GUIDE.replace('"ONNX"', '"TFLite"'), ["format 'TFLite' is not one inhouse serves", "onnx"]),
    (GUIDE.replace('"8Gi"', '"8Gb of RAM"'), ["resources.memory", "is not a size"]),
    (GUIDE.replace("cpu: 2", "cpu: lots"), ["resources.cpu", "not a number of cores"]),
    (GUIDE.replace("gpu: 1", "gpu: -1"), ["resources.gpu"]),
    (GUIDE.replace('"sequence"]}\n- {name: "attention', '"seq uence"]}\n- {name: "attention'),
     ["inputs[0]: shape dimension 'seq uence' is neither a number nor a name"]),
    (GUIDE + "instances: {device: cpu}\n", ["resources.gpu: 1 contradicts instances.device: cpu"]),
])
def test_bad_specs_are_refused_with_the_reason(text: str, fragments: list[str]) -> None:
    with pytest.raises(ModelSpecError) as err:
        _parse(text)
    assert err.value.code == 1005
    for f in fragments:
        assert f in err.value.message, (f, err.value.message)


def test_bad_guide_files_fail_to_load_over_rest(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_guide_model(root, servable().replace("resources:", "resorces:"), name="typo")
    write_guide_model(root, servable() + "backend: transformers\n", name="contradiction")
    write_guide_model(root, servable().replace('"64Mi"', '"1000Ti"'), name="huge")
    write_guide_model(root, GUIDE.replace('"8Gi"', '"64Mi"'), name="gpu-only")
    with run_server(root, load="none") as srv, srv.client() as c:
        _expect(c.post("/v2/repository/models/typo/load"), 422, 1005, "model_spec.yaml",
                "did you mean 'resources'?")
        _expect(c.post("/v2/repository/models/contradiction/load"), 422, 1005, "contradicts")
        _expect(c.post("/v2/repository/models/huge/load"), 507, 1003, "resources.memory", "available")
        if not HAS_CUDA:
            _expect(c.post("/v2/repository/models/gpu-only/load"), 422, 1005, "resources.gpu: 1",
                    "resources.allow_cpu_fallback")
        index = {e["name"]: e for e in c.post("/v2/repository/index").json()}
        assert index["huge"]["state"] == "FAILED" and index["huge"]["code"] == 1003
        assert all(index[n]["state"] != "READY" for n in ("typo", "contradiction", "huge"))
        # nothing broke: a good model still loads beside them
        write_guide_model(root, servable(), name="finance-bert-v1")
        assert c.post("/v2/repository/models/finance-bert-v1/load").status_code == 200


# ---- a Triton model folder (config.pbtxt) ----------------------------------------------------
TRITON_CONFIG = """\
name: "triton-bert"
platform: "onnxruntime_onnx"
max_batch_size: 8  # Triton's convention: the batch dimension is implied
input [
  { name: "input_ids", data_type: TYPE_INT64, dims: [ -1 ] },
  { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [ { name: "logits", data_type: TYPE_FP32, dims: [ 2 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 500 }
instance_group [ { count: 2, kind: KIND_CPU } ]
version_policy: { latest: { num_versions: 1 } }
"""


def write_triton_model(root: Path, name: str, config: str) -> None:
    mdir = root / name
    (mdir / "1").mkdir(parents=True)
    (mdir / "1" / "model.onnx").write_bytes(bert_like_model())
    (mdir / "config.pbtxt").write_text(config.replace('"triton-bert"', f'"{name}"'))


def test_triton_folder_serves(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_triton_model(root, "triton-bert", TRITON_CONFIG)
    write_triton_model(root, "unsupported", TRITON_CONFIG + "optimization { graph { level: 1 } }\n")
    write_triton_model(root, "typo", TRITON_CONFIG.replace("max_batch_size", "max_batch_sise"))
    write_triton_model(root, "torch", TRITON_CONFIG.replace("onnxruntime_onnx", "pytorch_libtorch"))
    write_triton_model(root, "broken", TRITON_CONFIG.replace("input [", "input [ {"))
    with run_server(root, load="triton-bert") as srv, srv.client() as c:
        meta = c.get("/v2/models/triton-bert").json()
        assert [t["shape"] for t in meta["inputs"]] == [[-1, -1], [-1, -1]]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]
        cfg = c.get("/v2/models/triton-bert/config").json()
        assert cfg["batching"]["max_batch_size"] == 8 and cfg["batching"]["preferred_batch_sizes"] == [4, 8]
        assert cfg["batching"]["max_queue_delay_ms"] == 0.5 and cfg["instances"] == {"count": 2, "device": "cpu"}
        r = c.post("/v2/models/triton-bert/infer", json=_request([[1, 2]], [[1, 1]]))
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [3, -3]
        _expect(c.post("/v2/repository/models/unsupported/load"), 422, 1005, "config.pbtxt", "'optimization'",
                "not supported")
        _expect(c.post("/v2/repository/models/typo/load"), 422, 1005, "did you mean 'max_batch_size'?")
        _expect(c.post("/v2/repository/models/torch/load"), 422, 1001, "pytorch_libtorch")
        _expect(c.post("/v2/repository/models/broken/load"), 422, 1005, "not valid protobuf text")
