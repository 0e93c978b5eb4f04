"""Wire compatibility, judged by a real client: Triton's ``tritonclient.http`` against inhouse."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from conftest import RunningServer, run_server
from models import add_model, identity_model, mlp_model, write_model

# v2 datatype → (ONNX element type, numpy dtype, sample values)
DATATYPES: dict[str, tuple[int, type, list[object]]] = {
    "BOOL": (TensorProto.BOOL, np.bool_, [True, False, True, True, False, False]),
    "INT8": (TensorProto.INT8, np.int8, [-128, -1, 0, 1, 2, 127]),
    "INT16": (TensorProto.INT16, np.int16, [-32768, -1, 0, 1, 300, 32767]),
    "INT32": (TensorProto.INT32, np.int32, [-(2**31), -1, 0, 1, 70000, 2**31 - 1]),
    "INT64": (TensorProto.INT64, np.int64, [-(2**63), -1, 0, 1, 2**40, 2**63 - 1]),
    "UINT8": (TensorProto.UINT8, np.uint8, [0, 1, 2, 100, 200, 255]),
    "UINT16": (TensorProto.UINT16, np.uint16, [0, 1, 2, 1000, 40000, 65535]),
    "UINT32": (TensorProto.UINT32, np.uint32, [0, 1, 2, 70000, 3_000_000_000, 2**32 - 1]),
    "UINT64": (TensorProto.UINT64, np.uint64, [0, 1, 2, 2**40, 2**63, 2**64 - 1]),
    "FP16": (TensorProto.FLOAT16, np.float16, [-1.5, 0.0, 0.25, 1.0, 2.0, 65504.0]),
    "FP32": (TensorProto.FLOAT, np.float32, [-1.5, 0.0, 0.1, 1.0, 3.25, 1e30]),
    "FP64": (TensorProto.DOUBLE, np.float64, [-1.5, 0.0, 0.1, 1.0, 3.25, 1e300]),
    "BYTES": (TensorProto.STRING, np.object_, [b"a", b"", "héllo".encode(), b"x y", b"\x00\x01", b"z" * 40]),
}


def _echo_name(dt: str) -> str:
    return f"echo-{dt.lower()}"


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("triton") / "models"
    root.mkdir()
    for dt, (onnx_type, _, _) in DATATYPES.items():
        write_model(root, _echo_name(dt), identity_model(onnx_type))
    write_model(root, "add", add_model())
    write_model(root, "mlp", mlp_model())
    with run_server(root, gzip_min_bytes=1024) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(triton_server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    yield c
    c.close()


def _sample(dt: str) -> np.ndarray:
    _, np_type, values = DATATYPES[dt]
    return np.array(values, dtype=np_type).reshape(2, 3)


@pytest.mark.parametrize("binary_in", [False, True], ids=["json_in", "binary_in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
@pytest.mark.parametrize("dt", list(DATATYPES))
def test_every_datatype_round_trips(client: httpclient.InferenceServerClient, dt: str,
                                    binary_in: bool, binary_out: bool) -> None:
    if dt == "FP16" and not binary_in:
        pytest.skip("tritonclient cannot send FP16 as JSON (it requires binary data for FP16)")
    x = _sample(dt)
    inp = httpclient.InferInput("x", list(x.shape), dt)
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("y", binary_data=binary_out)
    result = client.infer(_echo_name(dt), [inp], outputs=[out])
    got = result.as_numpy("y")
    assert got is not None and got.shape == x.shape
    spec = result.get_output("y")
    assert spec["datatype"] == dt
    assert ("binary_data_size" in spec.get("parameters", {})) == binary_out
    if dt == "BYTES":
        # JSON output carries text: tritonclient hands back str-encoded bytes either way
        expected = x if binary_out else np.array([v.decode("utf-8", "replace") for v in x.ravel()],
                                                  dtype=object).reshape(x.shape)
        got_b = [g if isinstance(g, bytes) else str(g).encode() for g in got.ravel()]
        exp_b = [e if isinstance(e, bytes) else str(e).encode() for e in expected.ravel()]
        if binary_out:
            assert got_b == exp_b
        else:  # JSON cannot carry non-UTF-8 bytes losslessly; every UTF-8 element must be exact
            assert got_b[:4] == exp_b[:4]
    elif dt in ("FP32", "FP64", "FP16"):
        np.testing.assert_array_equal(got.astype(x.dtype), x)
    else:
        assert got.dtype == x.dtype, (got.dtype, x.dtype)
        np.testing.assert_array_equal(got, x)


def test_requested_outputs_and_binary_data_output(client: httpclient.InferenceServerClient) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    ins = []
    for name in ("a", "b"):
        i = httpclient.InferInput(name, [2, 4], "FP32")
        i.set_data_from_numpy(a, binary_data=True)
        ins.append(i)
    # no requested outputs: tritonclient sets the request-wide binary_data_output parameter
    result = client.infer("add", ins, request_id="req-7")
    resp = result.get_response()
    assert resp["id"] == "req-7" and resp["model_name"] == "add" and resp["model_version"] == "1"
    assert resp["outputs"][0]["parameters"]["binary_data_size"] == 32
    np.testing.assert_array_equal(result.as_numpy("out"), a * 2)
    # an explicit output list, JSON
    result = client.infer("add", ins, outputs=[httpclient.InferRequestedOutput("out", binary_data=False)])
    assert "data" in result.get_output("out")
    # asking for an output the model lacks is a coded error
    with pytest.raises(InferenceServerException, match=r"2002.*no output 'nope'"):
        client.infer("add", ins, outputs=[httpclient.InferRequestedOutput("nope")])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_and_response_compression(client: httpclient.InferenceServerClient, algorithm: str) -> None:
    a = np.random.default_rng(0).standard_normal((400, 4)).astype(np.float32)
    ins = []
    for name in ("a", "b"):
        i = httpclient.InferInput(name, [400, 4], "FP32")
        i.set_data_from_numpy(a, binary_data=algorithm == "gzip")
        ins.append(i)
    result = client.infer("add", ins, request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("out"), a * 2, rtol=1e-6)


def test_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("mlp", "2")
    meta = client.get_server_metadata()
    assert meta["name"] == "inhouse" and {"model_repository", "binary_tensor_data"} <= set(meta["extensions"])
    m = client.get_model_metadata("mlp")
    assert m["name"] == "mlp" and m["versions"] == ["1"] and m["platform"] == "onnxruntime_onnx"
    assert m["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}]
    assert m["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert client.get_model_metadata("mlp", "1")["versions"] == ["1"]
    cfg = client.get_model_config("mlp")
    assert cfg["name"] == "mlp" and cfg["backend"] == "onnxruntime"
    assert cfg["inputs"][0]["name"] == "features"
    with pytest.raises(InferenceServerException, match="1002"):
        client.get_model_metadata("no-such-model")


def test_repository_index_load_unload(triton_server: RunningServer,
                                      client: httpclient.InferenceServerClient) -> None:
    index = {e["name"]: e for e in client.get_model_repository_index()}
    assert index["mlp"]["state"] == "READY" and index["mlp"]["version"] == "1"
    client.unload_model("mlp")
    assert not client.is_model_ready("mlp")
    states = {e["name"]: e["state"] for e in client.get_model_repository_index()}
    assert states["mlp"] == "UNLOADED"
    with pytest.raises(InferenceServerException, match="1002"):
        x = httpclient.InferInput("features", [1, 32], "FP32")
        x.set_data_from_numpy(np.zeros((1, 32), np.float32))
        client.infer("mlp", [x])
    client.load_model("mlp")
    assert client.is_model_ready("mlp")
    # load with a config override: merged over model.yaml for this load
    client.load_model("mlp", config=json.dumps({"description": "overridden", "warmup": {"samples": 2}}))
    cfg = client.get_model_config("mlp")
    assert cfg["description"] == "overridden" and cfg["warmup"]["samples"] == 2
    # a bad override is a coded error and the model keeps serving
    with pytest.raises(InferenceServerException, match=r"1005.*batching\.max_batch_sise"):
        client.load_model("mlp", config=json.dumps({"batching": {"max_batch_sise": 4}}))
    assert client.is_model_ready("mlp")
    assert client.get_model_config("mlp")["description"] == "overridden"
    # a plain load goes back to model.yaml as it is on disk
    client.load_model("mlp")
    assert client.get_model_config("mlp")["description"] == ""
    with pytest.raises(InferenceServerException, match="1002"):
        client.load_model("no-such-model")
    client.unload_model("mlp", unload_dependents=True)
    assert not client.is_model_ready("mlp")
    client.load_model("mlp")


def test_infer_errors_through_tritonclient(client: httpclient.InferenceServerClient) -> None:
    x = httpclient.InferInput("features", [1, 31], "FP32")
    x.set_data_from_numpy(np.zeros((1, 31), np.float32), binary_data=True)
    with pytest.raises(InferenceServerException, match="2005") as info:
        client.infer("mlp", [x])
    assert info.value.status() == "400"
    x = httpclient.InferInput("features", [1, 32], "FP64")
    x.set_data_from_numpy(np.zeros((1, 32), np.float64))
    with pytest.raises(InferenceServerException, match="2006"):
        client.infer("mlp", [x])

