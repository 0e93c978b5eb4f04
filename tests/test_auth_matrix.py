"""Every HTTP route and every declared RPC, called with every kind of bad credential (none, a
key nobody issued, revoked, expired, lacking the scope, limited to another model, bound to other
addresses), answers as its guard says: 401 / UNAUTHENTICATED, 403 / PERMISSION_DENIED, or (open
routes, cases the guard allows) not refused and never a 5xx / INTERNAL. A server whose allow-list
excludes the caller refuses every route but the open ones (see tests/auth_matrix.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import auth_matrix
from conftest import run_server
from models import add_model, write_model


@pytest.fixture
def matrix_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    repo.mkdir()
    write_model(repo, "add", add_model(), {"inputs": [
        {"name": "a", "dtype": "FP32", "shape": [-1, 4]}, {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]})
    return repo


def test_every_route_and_rpc_against_every_bad_credential(matrix_repo: Path) -> None:
    data = matrix_repo.parent / "data"
    creds = auth_matrix.make_credentials(data)
    with run_server(matrix_repo, auth=True, data_dir=data, load="add") as srv:
        calls = auth_matrix.http_calls(srv.server.app.routes)
        n_http, bad_http = auth_matrix.run_http(srv.url, calls, creds)
        assert srv.grpc_target is not None
        n_rpc, bad_rpc = auth_matrix.run_grpc(srv.grpc_target, creds)
        # every route and RPC was reached in every case, and the model was never unloaded by one
        assert srv.server.manager.serving() and "add" in srv.server.manager.serving()
    assert n_http >= 7 * 55 and n_rpc >= 7 * 15
    assert bad_http + bad_rpc == []


def test_a_server_allow_list_excluding_the_caller(matrix_repo: Path) -> None:
    data = matrix_repo.parent / "data"
    creds = auth_matrix.make_credentials(data)
    with run_server(matrix_repo, auth=True, data_dir=data, load="add", allow_ips=["10.0.0.0/8"]) as srv:
        calls = auth_matrix.http_calls(srv.server.app.routes)
        _, bad_http = auth_matrix.run_http(srv.url, calls, creds, cases=["good"], want_all=403)
        assert srv.grpc_target is not None
        _, bad_rpc = auth_matrix.run_grpc(srv.grpc_target, creds, cases=["good"], want_all=403)
    assert bad_http + bad_rpc == []
