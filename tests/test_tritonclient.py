"""Wire compatibility, judged by a real client: Triton's ``tritonclient.http`` against inhouse."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import zlib
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


class _Wire:
    """A TCP relay in front of the server that keeps every byte each way, so a test sees what a
    client really sent and received (headers and compressed bodies)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.sent = bytearray()
        self.received = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            for src, dst, log in ((client, upstream, self.sent), (upstream, client, self.received)):
                threading.Thread(target=self._pipe, args=(src, dst, log), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                log += chunk
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def _head_and_body(raw: bytes) -> tuple[dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    headers = {k.lower(): v for k, v in fields.items()}
    return headers, body[: int(headers["content-length"])]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_and_response_compression(triton_server: RunningServer, algorithm: str) -> None:
    """Seen on the wire: tritonclient's compressed request is smaller than the tensors and
    decoded by the server; the answer comes back gzip-compressed when gzip is accepted (responses
    are compressed with gzip only, so a deflate-only client gets plain bytes)."""
    a = np.random.default_rng(0).standard_normal((400, 4)).astype(np.float32)
    wire = _Wire(triton_server.url.removeprefix("http://"))
    client = httpclient.InferenceServerClient(wire.address)
    try:
        ins = []
        for name in ("a", "b"):
            i = httpclient.InferInput(name, [400, 4], "FP32")
            i.set_data_from_numpy(np.zeros_like(a) if name == "b" else a, binary_data=algorithm == "gzip")
            ins.append(i)
        result = client.infer("add", ins, request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("out"), a, rtol=1e-6)
    finally:
        client.close()
        wire.close()
    sent_headers, sent_body = _head_and_body(bytes(wire.sent))
    assert sent_headers["content-encoding"] == algorithm
    unpack = gzip.decompress if algorithm == "gzip" else zlib.decompress
    assert len(sent_body) < len(unpack(sent_body))
    got_headers, got_body = _head_and_body(bytes(wire.received))
    if algorithm == "gzip":
        assert got_headers["content-encoding"] == "gzip"
        plain = gzip.decompress(got_body)
        assert len(got_body) < len(plain) and len(plain) >= 400 * 4 * 4  # the FP32 output, at least
    else:
        assert "content-encoding" not in got_headers and len(got_body) >= 400 * 4 * 4


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

