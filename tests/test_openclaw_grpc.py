"""OpenClaw's ``openclaw.api.v1.ModelService`` on inhouse's gRPC port: LoadModel / UnloadModel /
ListModels with a grpcio client built from the generated stubs, reflection, the admin scope, and
the folder rule that keeps model_path and config_path inside the repository or model_dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import RunningServer, run_server
from inhouse.protocols.proto import openclaw_model_service_pb2 as pb
from inhouse.protocols.proto import openclaw_model_service_pb2_grpc as pb_grpc
from inhouse.security.keys import KeyStore
from models import add_model, write_model
from test_model_spec_guide import bert_like_model, servable

INFER = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]},
                    {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]}]}


def write_guide_folder(folder: Path, spec: str | None = None) -> Path:
    """The guide's layout: a version folder holding the artefact and its model_spec.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(bert_like_model())
    (folder / "model_spec.yaml").write_text(servable() if spec is None else spec)
    return folder


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    repo = tmp_path / "models"
    repo.mkdir()
    write_model(repo, "add", add_model())
    external = tmp_path / "openclaw-models"  # the guide's /models, configured as model_dirs
    v1 = write_guide_folder(external / "finance" / "bert" / "v1")
    outside = write_guide_folder(tmp_path / "elsewhere" / "v1")
    return {"repo": repo, "external": external, "v1": v1, "outside": outside, "tmp": tmp_path}


@pytest.fixture
def srv(layout: dict[str, Path]) -> Iterator[RunningServer]:
    with run_server(layout["repo"], model_dirs=[layout["external"]]) as s:
        yield s


@pytest.fixture
def stub(srv: RunningServer) -> Iterator[Any]:
    assert srv.grpc_target is not None
    with grpc.insecure_channel(srv.grpc_target) as ch:
        yield pb_grpc.ModelServiceStub(ch)  # type: ignore[no-untyped-call]


def _load(stub: Any, name: str, path: Path | str, config: Path | str = "", **kw: Any) -> Any:
    return stub.LoadModel(pb.LoadModelRequest(model_name=name, model_path=str(path), config_path=str(config)),
                          **kw)


def _refused(call: Any, status: grpc.StatusCode, code: int, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == status, err.value
    details: str = err.value.details()
    assert details.startswith(f"[{code}] "), details
    assert dict(err.value.trailing_metadata())["inhouse-error-code"] == str(code)
    for f in fragments:
        assert f in details, (f, details)
    return details


def _statuses(stub: Any) -> dict[str, Any]:
    return {m.model_name: m for m in stub.ListModels(pb.ListModelsRequest()).models}


def test_load_and_unload_as_the_guide_calls_them(srv: RunningServer, stub: Any, layout: dict[str, Path]) -> None:
    v1 = layout["v1"]
    resp = _load(stub, "finance-bert-v1", v1, v1 / "model_spec.yaml")
    assert resp.success and resp.state == "READY" and list(resp.versions) == ["1"]  # v1 → version 1
    assert "finance-bert-v1" in resp.message
    with srv.client() as c:
        r = c.post("/v2/models/finance-bert-v1/infer", json=INFER)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [6, -6]
        assert c.get("/v2/models/finance-bert-v1").json()["parameters"] == {"version": "1.0.0"}
        status = _statuses(stub)["finance-bert-v1"]
        assert (status.state, status.version, status.model_path) == ("READY", "1", str(v1))
        assert _statuses(stub)["add"].state == "READY" and _statuses(stub)["add"].model_path == ""

        # loading again is idempotent; empty config_path means the spec inside model_path
        assert _load(stub, "finance-bert-v1", v1).success
        resp2 = stub.UnloadModel(pb.UnloadModelRequest(model_name="finance-bert-v1"))
        assert resp2.success and resp2.state == "UNLOADED"
        srv.call(srv.server.manager.settle())
        assert c.get("/v2/models/finance-bert-v1/ready").status_code != 200
        assert _statuses(stub)["finance-bert-v1"].state == "UNLOADED"
        _refused(lambda: stub.UnloadModel(pb.UnloadModelRequest(model_name="finance-bert-v1")),
                 grpc.StatusCode.UNAVAILABLE, 1002, "not loaded")
        assert _load(stub, "finance-bert-v1", v1).state == "READY"
        assert c.post("/v2/models/finance-bert-v1/infer", json=INFER).status_code == 200


def test_model_folder_with_numbered_versions(stub: Any, layout: dict[str, Path]) -> None:
    folder = layout["external"] / "credit"
    for v in (1, 2):
        write_guide_folder(folder / str(v), spec="")
    spec = folder / "spec.yaml"
    spec.write_text(servable().replace('"finance-bert-v1"', '"credit"'))
    resp = _load(stub, "credit", folder, spec)
    assert list(resp.versions) == ["2"]  # the spec's version policy: the newest


def test_reflection_lists_the_service(srv: RunningServer) -> None:
    assert srv.grpc_target is not None
    with grpc.insecure_channel(srv.grpc_target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert {"openclaw.api.v1.ModelService", "inference.GRPCInferenceService"} <= set(db.get_services())
        svc = DescriptorPool(db).FindServiceByName("openclaw.api.v1.ModelService")
        assert set(svc.methods_by_name) == {"LoadModel", "UnloadModel", "ListModels"}
        req = svc.methods_by_name["LoadModel"].input_type
        assert [(f.name, f.number) for f in req.fields] == [("model_name", 1), ("model_path", 2), ("config_path", 3)]
        resp = svc.methods_by_name["LoadModel"].output_type
        assert {"success", "state", "message"} <= set(resp.fields_by_name)


def test_paths_outside_allowed_folders_are_refused(stub: Any, layout: dict[str, Path]) -> None:
    outside, v1 = layout["outside"], layout["v1"]
    msg = _refused(lambda: _load(stub, "finance-bert-v1", outside), grpc.StatusCode.PERMISSION_DENIED, 4003,
                   "'model_path'", "model_dirs")
    assert str(layout["external"]) in msg
    _refused(lambda: _load(stub, "finance-bert-v1", "../elsewhere/v1"), grpc.StatusCode.PERMISSION_DENIED,
             4003, "model_dirs")
    _refused(lambda: _load(stub, "finance-bert-v1", v1, outside / "model_spec.yaml"),
             grpc.StatusCode.PERMISSION_DENIED, 4003, "'config_path'", "model_dirs")
    _refused(lambda: _load(stub, "finance-bert-v1", "file:///etc"), grpc.StatusCode.PERMISSION_DENIED, 4003, "URL")
    # a symlink inside model_dirs that leads out of them is judged by where it leads
    (layout["external"] / "sneaky").symlink_to(outside, target_is_directory=True)
    _refused(lambda: _load(stub, "finance-bert-v1", layout["external"] / "sneaky"),
             grpc.StatusCode.PERMISSION_DENIED, 4003, "model_dirs")
    assert "finance-bert-v1" not in _statuses(stub)


def test_bad_requests_and_bad_config(srv: RunningServer, stub: Any, layout: dict[str, Path]) -> None:
    v1 = layout["v1"]
    _refused(lambda: _load(stub, "", v1), grpc.StatusCode.INVALID_ARGUMENT, 2001, "model_name is empty")
    _refused(lambda: _load(stub, "finance-bert-v1", ""), grpc.StatusCode.INVALID_ARGUMENT, 2001, "model_path")
    typo = v1.parent / "typo.yaml"
    typo.write_text(servable().replace("resources:", "resorces:"))
    _refused(lambda: _load(stub, "finance-bert-v1", v1, typo), grpc.StatusCode.INVALID_ARGUMENT, 1005,
             str(typo), "did you mean 'resources'?")
    _refused(lambda: _load(stub, "finance-bert-v1", v1, v1 / "missing.yaml"), grpc.StatusCode.INVALID_ARGUMENT,
             1005, "config_path", "is not a file")
    _refused(lambda: _load(stub, "other-name", v1), grpc.StatusCode.INVALID_ARGUMENT, 1005,
             "'finance-bert-v1' differs from model_name 'other-name'")
    _refused(lambda: _load(stub, "add", v1), grpc.StatusCode.INVALID_ARGUMENT, 1005, "differs from model_name")
    _refused(lambda: _load(stub, "finance-bert-v1", v1 / "model.onnx"), grpc.StatusCode.INVALID_ARGUMENT, 1005,
             "is not a folder")
    _refused(lambda: _load(stub, "bad/../name", v1), grpc.StatusCode.INVALID_ARGUMENT, 1005)
    # nothing half-loaded: none of those left a model or a link behind
    statuses = _statuses(stub)
    assert "finance-bert-v1" not in statuses and "other-name" not in statuses
    assert srv.server.manager.repository.linked("finance-bert-v1") is None
    # a model of the repository's own may not be replaced by one from elsewhere
    clash = write_guide_folder(layout["external"] / "clash", servable().replace('"finance-bert-v1"', '"add"'))
    _refused(lambda: _load(stub, "add", clash), grpc.StatusCode.INVALID_ARGUMENT, 2001, "already in the repository")
    with srv.client() as c:
        assert c.get("/v2/models/add/ready").status_code == 200


def test_failed_reload_keeps_the_serving_version(srv: RunningServer, stub: Any, layout: dict[str, Path]) -> None:
    v1 = layout["v1"]
    assert _load(stub, "finance-bert-v1", v1).success
    v2 = write_guide_folder(layout["external"] / "finance" / "bert" / "v2",
                            servable().replace('"64Mi"', '"1000Ti"'))
    _refused(lambda: _load(stub, "finance-bert-v1", v2), grpc.StatusCode.RESOURCE_EXHAUSTED, 1003,
             "resources.memory")
    with srv.client() as c:
        assert c.post("/v2/models/finance-bert-v1/infer", json=INFER).status_code == 200
    assert srv.server.manager.repository.linked("finance-bert-v1").folder == v1  # type: ignore[union-attr]


def test_admin_scope_required(layout: dict[str, Path]) -> None:
    data = layout["tmp"] / "data"
    store = KeyStore(data)
    infer_key = store.create("app", ["infer"])[0]
    admin_key = store.create("ops", ["admin"])[0]
    store.close()
    with run_server(layout["repo"], auth=True, data_dir=data, model_dirs=[layout["external"]]) as s:
        assert s.grpc_target is not None
        with grpc.insecure_channel(s.grpc_target) as ch:
            stub = pb_grpc.ModelServiceStub(ch)  # type: ignore[no-untyped-call]
            v1 = layout["v1"]
            _refused(lambda: _load(stub, "finance-bert-v1", v1), grpc.StatusCode.UNAUTHENTICATED, 4001)
            for call in (lambda md: _load(stub, "finance-bert-v1", v1, metadata=md),
                         lambda md: stub.UnloadModel(pb.UnloadModelRequest(model_name="add"), metadata=md),
                         lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md)):
                _refused(lambda call=call: call([("authorization", f"Bearer {infer_key}")]),  # type: ignore[misc]
                         grpc.StatusCode.PERMISSION_DENIED, 4003, "admin")
            md = [("authorization", f"Bearer {admin_key}")]
            assert _load(stub, "finance-bert-v1", v1, metadata=md).state == "READY"
            assert "finance-bert-v1" in {m.model_name for m in stub.ListModels(pb.ListModelsRequest(),
                                                                               metadata=md).models}
            assert stub.UnloadModel(pb.UnloadModelRequest(model_name="finance-bert-v1"), metadata=md).success
