"""Readiness under --auth: open like liveness by default (a Kubernetes probe or a load balancer
has no key), a bare ready / not ready and nothing else; ``open_readiness: false`` puts it back
behind the metrics scope, on REST and gRPC alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from conftest import RunningServer, run_server
from inhouse.security.keys import KeyStore

READINESS_PATHS = ("/v2/health/ready", "/health/ready", "/health")


@contextmanager
def _secured(repo: Path, **settings: object) -> Iterator[tuple[RunningServer, dict[str, str]]]:
    data = repo.parent / "data"
    store = KeyStore(data)
    keys = {"metrics": store.create("probe", ["metrics"])[0], "infer": store.create("app", ["infer"])[0]}
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add", **settings) as srv:
        yield srv, keys


def test_readiness_answers_without_a_key_under_auth(repo: Path) -> None:
    with _secured(repo) as (srv, _), srv.client() as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/health/ready").json() == {"ready": True}
        assert c.get("/health").json() == {"status": "ok", "live": True, "ready": True}  # no model names
        # nothing else opened: model readiness and metadata still need a key
        assert c.get("/v2/models/add/ready").status_code == 401
        assert c.get("/v2").status_code == 401
        assert c.get("/metrics").status_code == 401
        with grpc.insecure_channel(srv.grpc_target) as ch:  # type: ignore[arg-type]
            assert tpb_grpc.GRPCInferenceServiceStub(ch).ServerReady(tpb.ServerReadyRequest()).ready
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                tpb_grpc.GRPCInferenceServiceStub(ch).ServerMetadata(tpb.ServerMetadataRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_closed_readiness_needs_the_metrics_scope(repo: Path) -> None:
    with _secured(repo, open_readiness=False) as (srv, keys), srv.client() as c:
        for path in READINESS_PATHS:
            r = c.get(path)
            assert r.status_code == 401 and r.headers["inhouse-error-code"] == "4001", path
            assert c.get(path, headers={"x-api-key": keys["infer"]}).status_code == 403, path
            assert c.get(path, headers={"x-api-key": keys["metrics"]}).json()["ready"] is True, path
        with grpc.insecure_channel(srv.grpc_target) as ch:  # type: ignore[arg-type]
            stub = tpb_grpc.GRPCInferenceServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            for call in (lambda md: stub.ServerReady(tpb.ServerReadyRequest(), metadata=md),
                         lambda md: health.Check(health_pb2.HealthCheckRequest(), metadata=md)):
                with pytest.raises(grpc.RpcError) as err:
                    call(None)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert call([("x-api-key", keys["metrics"])])
