"""Every kind of bad input gets a clear, coded error — never a 500, a hang or a crash — and the
server keeps serving its other models afterwards."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import RunningServer, run_server
from inhouse.errors import PayloadTooLargeError
from inhouse.protocols.http_body import INFLATE_PIECE, decode_body
from models import add_model, identity_model, mlp_model, write_model

LIMIT = 8192


def _future_opset_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 99)])
    m.ir_version = 8
    return m.SerializeToString()


def _unknown_op_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    m = helper.make_model(
        helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    m.ir_version = 8
    return m.SerializeToString()


def _alloc_model() -> bytes:
    """y = zeros(shape): the request decides how much memory the model asks for."""
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m"])
    m = helper.make_model(helper.make_graph([helper.make_node("ConstantOfShape", ["shape"], ["y"])], "g",
                                            [shape], [y]), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


@pytest.fixture(scope="module")
def bad_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "models"
    root.mkdir()
    write_model(root, "add", add_model(), checksum=True)
    write_model(root, "mlp", mlp_model())
    write_model(root, "echo-str", identity_model(TensorProto.STRING))
    write_model(root, "alloc", _alloc_model())
    (root / "no-versions").mkdir()
    (root / "no-versions" / "model.yaml").write_text("backend: onnxruntime\n")
    write_model(root, "typo", mlp_model(), {"batching": {"max_batch_sise": 8}})
    (root / "typo-nested").mkdir()
    (root / "typo-nested" / "model_spec.yaml").write_text(
        "name: typo-nested\ninputs:\n  - {name: features, dtype: FP23, shape: [-1, 32]}\n")
    (root / "typo-nested" / "1").mkdir()
    (root / "typo-nested" / "1" / "model.onnx").write_bytes(mlp_model())
    write_model(root, "bad-yaml", mlp_model())
    (root / "bad-yaml" / "model.yaml").write_text("name: bad-yaml\nbatching: {max_batch_size: 4\n")
    write_model(root, "truncated", mlp_model()[:200])
    write_model(root, "corrupted", b"\x08\x07garbage that is not a protobuf" * 20)
    write_model(root, "checksum", mlp_model(), checksum=True)
    (root / "checksum" / "1" / "model.onnx").write_bytes(mlp_model(seed=1))  # replaced after hashing
    write_model(root, "no-provider", mlp_model(), {"onnxruntime": {"providers": ["cuda"]}})
    write_model(root, "future-opset", _future_opset_model())
    write_model(root, "unknown-op", _unknown_op_model())
    write_model(root, "wrong-dtype", mlp_model(), {"inputs": [{"name": "features", "dtype": "INT64",
                                                              "shape": [-1, 32]}]})
    write_model(root, "wrong-rank", mlp_model(), {"inputs": [{"name": "features", "dtype": "FP32",
                                                             "shape": [-1, 32, 1]}]})
    write_model(root, "wrong-name", mlp_model(), {"outputs": [{"name": "probs", "dtype": "FP32",
                                                              "shape": [-1, 2]}]})
    write_model(root, "no-artefact", mlp_model())
    (root / "no-artefact" / "1" / "model.onnx").unlink()
    write_model(root, "unknown-backend", mlp_model(), {"backend": "tensorflow"})
    return root


@pytest.fixture(scope="module")
def srv(bad_repo: Path) -> Iterator[RunningServer]:
    with run_server(bad_repo, max_request_bytes=LIMIT) as s:
        yield s


@pytest.fixture
def c(srv: RunningServer) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client
    # after every bad request: the server is up and the good models still answer
    with srv.client() as client:
        assert client.get("/v2/health/ready").status_code == 200
        r = client.post("/v2/models/add/infer", json=_add_request())
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0], r.text
        r = client.post("/v2/models/mlp/infer", json={"inputs": [
            {"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]})
        assert r.status_code == 200, r.text


def _add_request(**changes: Any) -> dict[str, Any]:
    a = {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    b = {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    a.update(changes)
    return {"inputs": [a, b]}


def _expect(r: httpx.Response, status: int, code: int, *fragments: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["inhouse-error-code"] == str(code), r.headers
    body = r.json()
    assert set(body) == {"error"}, body  # v2 error bodies stay {"error": "..."}
    msg: str = body["error"]
    assert msg.startswith(f"[{code}] "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ---- requests ------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"inputs": "x"}', b'{"inputs": []}',
                                  b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}'])
def test_malformed_json(c: httpx.Client, body: bytes) -> None:
    _expect(c.post("/v2/models/add/infer", content=body, headers={"content-type": "application/json"}), 400, 2001)


def test_wrong_shape(c: httpx.Client) -> None:
    _expect(c.post("/v2/models/add/infer", json=_add_request(shape=[1, 5], data=[1] * 5)), 400, 2005,
            "shape [1, 5]", "[-1, 4]")
    _expect(c.post("/v2/models/add/infer", json=_add_request(shape=[4], data=[1] * 4)), 400, 2005)
    _expect(c.post("/v2/models/add/infer", json=_add_request(shape=[1, -4], data=[1] * 4)), 400, 2005)


def test_wrong_datatype(c: httpx.Client) -> None:
    _expect(c.post("/v2/models/add/infer", json=_add_request(datatype="INT32")), 400, 2006, "must be FP32")
    _expect(c.post("/v2/models/add/infer", json=_add_request(datatype="FLOAT99")), 400, 2006, "FP32")
    _expect(c.post("/v2/models/add/infer", json=_add_request(data=["a", "b", "c", "d"])), 400, 2006)
    _expect(c.post("/v2/models/add/infer", json=_add_request(data=[1, None, 3, 4])), 400, 2006)


def test_missing_and_extra_inputs(c: httpx.Client) -> None:
    body = _add_request()
    body["inputs"] = body["inputs"][:1]
    _expect(c.post("/v2/models/add/infer", json=body), 400, 2002, "['b']")
    body = _add_request()
    body["inputs"].append({"name": "c", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4})
    _expect(c.post("/v2/models/add/infer", json=body), 400, 2002, "no input 'c'")
    body = _add_request()
    body["inputs"].append(body["inputs"][0])
    _expect(c.post("/v2/models/add/infer", json=body), 400, 2002, "more than once")


def test_data_length_not_matching_shape(c: httpx.Client) -> None:
    _expect(c.post("/v2/models/add/infer", json=_add_request(data=[1, 2, 3])), 400, 2005,
            "3 elements", "needs 4")
    # binary: 12 bytes where [1, 4] FP32 needs 16
    header = (b'{"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "parameters": '
              b'{"binary_data_size": 12}}, {"name": "b", "shape": [1, 4], "datatype": "FP32", '
              b'"data": [1, 2, 3, 4]}]}')
    r = c.post("/v2/models/add/infer", content=header + b"\0" * 12,
               headers={"inference-header-content-length": str(len(header))})
    _expect(r, 400, 2005, "12 bytes", "16 bytes")
    # the binary part is shorter than binary_data_size says
    r = c.post("/v2/models/add/infer", content=header.replace(b"12", b"16") + b"\0" * 12,
               headers={"inference-header-content-length": str(len(header))})
    _expect(r, 400, 2005, "only 12 remain")
    # a huge BYTES shape with a few bytes of data: refused before anything is allocated
    header = (b'{"inputs": [{"name": "x", "shape": [1000000, 1000000], "datatype": "BYTES", '
              b'"parameters": {"binary_data_size": 9}}]}')
    r = c.post("/v2/models/echo-str/infer", content=header + b"\x05\0\0\0hello",
               headers={"inference-header-content-length": str(len(header))})
    _expect(r, 400, 2005, "too few")
    r = c.post("/v2/models/echo-str/infer", json={"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "b"]}]})
    _expect(r, 400, 2005, "2 elements")
    r = c.post("/v2/models/echo-str/infer", json={"inputs": [
        {"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": ["a", 5]}]})
    _expect(r, 400, 2006, "must be strings")
    # header length pointing past the body
    r = c.post("/v2/models/add/infer", content=header, headers={"inference-header-content-length": "99999"})
    _expect(r, 400, 2001, "Inference-Header-Content-Length")


def test_unknown_model_and_version(c: httpx.Client) -> None:
    _expect(c.post("/v2/models/nope/infer", json=_add_request()), 404, 1002, "'nope'", "add")
    _expect(c.post("/v2/models/add/versions/7/infer", json=_add_request()), 404, 1002, "version 7")
    _expect(c.post("/v2/models/add/versions/x/infer", json=_add_request()), 400, 2001, "'x'")
    _expect(c.get("/v2/models/nope"), 404, 1002)
    _expect(c.get("/v2/models/nope/ready"), 404, 1002)
    _expect(c.post("/v2/repository/models/nope/load"), 404, 1002)
    _expect(c.post("/v2/repository/models/..%2F..%2Fetc/load"), 404, 2004)  # no route takes a name with slashes
    _expect(c.get("/v2/no/such/route"), 404, 2004, "No such endpoint: GET /v2/no/such/route")


def test_model_not_ready(srv: RunningServer, c: httpx.Client) -> None:
    # failed at start-up: 503 with the reason
    _expect(c.post("/v2/models/typo/infer", json={"inputs": [
        {"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0] * 32}]}), 503, 1002,
        "failed to load", "max_batch_sise")
    assert c.get("/v2/models/typo/ready").status_code == 503
    # explicitly unloaded
    assert c.post("/v2/repository/models/mlp/unload").status_code == 200
    try:
        msg = _expect(c.post("/v2/models/mlp/infer", json={"inputs": [
            {"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0] * 32}]}), 503, 1002)
        assert "inhouse models load mlp" in msg
        _expect(c.post("/v2/repository/models/mlp/unload"), 503, 1002, "nothing to unload")
    finally:
        assert c.post("/v2/repository/models/mlp/load").status_code == 200


def test_body_over_size_limit(c: httpx.Client) -> None:
    big = _add_request(shape=[1000, 4], data=[1.0] * 4000)
    _expect(c.post("/v2/models/add/infer", json=big), 413, 2013, str(LIMIT), "max_request_bytes")
    # chunked upload without Content-Length is cut off while streaming
    _expect(c.post("/v2/models/add/infer", content=iter([b"x" * 5000, b"x" * 5000])), 413, 2013)
    # a small gzip body that inflates past the limit (a "zip bomb") is refused too
    bomb = gzip.compress(b'{"inputs": [' + b" " * (LIMIT * 4) + b"]}")
    assert len(bomb) < LIMIT
    _expect(c.post("/v2/models/add/infer", content=bomb, headers={"content-encoding": "gzip"}), 413, 2013)
    _expect(c.post("/v2/models/add/infer", content=b"not gzip", headers={"content-encoding": "gzip"}),
            400, 2001, "gzip")
    _expect(c.post("/v2/models/add/infer", content=b"{}", headers={"content-encoding": "br"}), 400, 2001)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_bomb_memory_is_bounded_and_freed(encoding: str) -> None:
    # A bomb inflates to at most the limit plus one piece, and nothing of it outlives the 413:
    # the error's traceback (kept by whoever logs or holds it) used to keep the whole inflated
    # buffer alive, one limit's worth per bomb.
    limit = 8 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    bomb = b"".join(c.compress(b"\0" * (1 << 20)) for _ in range(64)) + c.flush()
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLargeError) as info:
            decode_body(bomb, limit, encoding)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == 2013
    assert held < 1 << 20, f"{held} bytes still held after the 413"
    assert peak < limit + 4 * INFLATE_PIECE, peak
    # a body inflating to exactly the limit is still accepted, whole
    doc = b"x" * limit
    assert decode_body(gzip.compress(doc) if encoding == "gzip" else zlib.compress(doc), limit, encoding) == doc


def test_out_of_memory_while_running(c: httpx.Client) -> None:
    ok = c.post("/v2/models/alloc/infer", json={"inputs": [
        {"name": "shape", "shape": [2], "datatype": "INT64", "data": [2, 3]}]})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [2, 3]
    # 4 * 10**18 bytes: beyond any address space, so the allocation fails whatever the overcommit policy
    r = c.post("/v2/models/alloc/infer", json={"inputs": [
        {"name": "shape", "shape": [2], "datatype": "INT64", "data": [10**9, 10**9]}]})
    msg = _expect(r, 507, 1003, "Out of memory", "Failed to allocate memory")
    assert "onnxruntime_src" not in msg
    assert c.post("/v2/models/alloc/infer", json={"inputs": [
        {"name": "shape", "shape": [2], "datatype": "INT64", "data": [1, 1]}]}).status_code == 200


# ---- model folders and artefacts --------------------------------------------------------

def _index(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.post("/v2/repository/index").json()}


def test_typo_in_model_yaml(bad_repo: Path, c: httpx.Client) -> None:
    msg = _expect(c.post("/v2/repository/models/typo/load"), 422, 1005,
                  str(bad_repo / "typo" / "model.yaml"), "batching.max_batch_sise", "did you mean 'max_batch_size'?")
    entry = _index(c)["typo"]
    assert entry["state"] == "FAILED" and entry["code"] == 1005 and entry["reason"] in msg
    _expect(c.post("/v2/repository/models/typo-nested/load"), 422, 1005,
            str(bad_repo / "typo-nested" / "model_spec.yaml"), "inputs[0].dtype", "'FP23' is not a datatype",
            "FP32")
    _expect(c.post("/v2/repository/models/bad-yaml/load"), 422, 1005, "not valid YAML", "line ")


def test_bad_load_override(c: httpx.Client) -> None:
    _expect(c.post("/v2/repository/models/mlp/load", json={"parameters": {"config": "{oops"}}), 400, 2001,
            "parameters.config")
    _expect(c.post("/v2/repository/models/mlp/load", json={"parameters": {"config": '{"batching": '
                                                                         '{"max_batch_size": -1}}'}}),
            422, 1005, "batching.max_batch_size", "load-time overrides")
    _expect(c.post("/v2/repository/models/mlp/load", json={"parameters": {"colour": "red"}}), 400, 2001, "colour")


def test_model_folder_without_versions(bad_repo: Path, c: httpx.Client) -> None:
    _expect(c.post("/v2/repository/models/no-versions/load"), 422, 1005, "has no versions",
            str(bad_repo / "no-versions" / "1"))
    assert _index(c)["no-versions"]["state"] == "FAILED"
    _expect(c.post("/v2/repository/models/no-artefact/load"), 422, 1005, "has no 'model.onnx'")


@pytest.mark.parametrize("name", ["truncated", "corrupted"])
def test_corrupted_or_truncated_model_file(c: httpx.Client, name: str) -> None:
    _expect(c.post(f"/v2/repository/models/{name}/load"), 422, 1001, "not a readable ONNX model",
            "truncated, corrupted")
    entry = _index(c)[name]
    assert entry["state"] == "FAILED" and entry["code"] == 1001 and entry["version"] == "1"


def test_checksum_mismatch(c: httpx.Client) -> None:
    _expect(c.post("/v2/repository/models/checksum/load"), 422, 1004, "Checksum mismatch", "1/model.onnx")
    assert _index(c)["checksum"]["code"] == 1004


def test_unavailable_execution_provider_lists_available_ones(c: httpx.Client) -> None:
    import onnxruntime as ort

    msg = _expect(c.post("/v2/repository/models/no-provider/load"), 422, 1001, "'cuda'", "Available:")
    for p in ort.get_available_providers():
        assert p in msg


def test_unsupported_opset_or_operator(c: httpx.Client) -> None:
    msg = _expect(c.post("/v2/repository/models/future-opset/load"), 422, 1001, "Opset 99")
    assert "onnxruntime_src" not in msg and "::" not in msg  # no C++ locations in user messages
    _expect(c.post("/v2/repository/models/unknown-op/load"), 422, 1001, "Frobnicate")


def test_spec_disagreeing_with_graph(c: httpx.Client) -> None:
    _expect(c.post("/v2/repository/models/wrong-dtype/load"), 400, 2006, "INT64", "write dtype: FP32")
    _expect(c.post("/v2/repository/models/wrong-rank/load"), 400, 2005, "rank 3", "rank 2")
    _expect(c.post("/v2/repository/models/wrong-name/load"), 422, 1001, "['probs']", "probabilities")


def test_unknown_backend(c: httpx.Client) -> None:
    _expect(c.post("/v2/repository/models/unknown-backend/load"), 422, 1001, "'tensorflow'", "onnxruntime")


def test_onnx_checker_agrees_files_are_bad(bad_repo: Path) -> None:
    # guard the fixtures: these really are broken ONNX files, not an inhouse quirk
    for name in ("truncated", "corrupted"):
        with pytest.raises(Exception):  # noqa: B017
            onnx.load_model_from_string((bad_repo / name / "1" / "model.onnx").read_bytes())
