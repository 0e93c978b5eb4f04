"""Transformers models inside a real server: loaded by the ModelManager, listed in the v2
repository, answering v2 BYTES requests; the engine and embedder reachable as the adapters use
them; bad input and bad models give coded errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import run_server
from inhouse.errors import InvalidRequestError, ModelNotReadyError
from inhouse.llm.types import GenerationRequest, SamplingParams
from llm_fixtures import write_llm_model


def test_llm_models_in_v2_repository_and_infer(llm_repo: Path) -> None:
    with run_server(llm_repo) as srv, srv.client(timeout=120) as c:
        index = {e["name"]: e for e in c.post("/v2/repository/index", json={}).json()}
        assert {index[n]["state"] for n in ("tiny-llama", "tiny-qwen", "tiny-bert")} == {"READY"}
        meta = c.get("/v2/models/tiny-llama").json()
        assert meta["platform"] == "transformers"
        assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
        r = c.post("/v2/models/tiny-llama/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["hello world", "the weather"]}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "text_output" and out["shape"] == [2] and all(isinstance(t, str) for t in out["data"])
        r = c.post("/v2/models/tiny-bert/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "a"]}]})
        assert r.status_code == 200, r.text
        emb = np.array(r.json()["outputs"][0]["data"]).reshape(r.json()["outputs"][0]["shape"])
        assert emb.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(emb[0], emb[2], rtol=1e-5)
        assert not np.allclose(emb[0], emb[1])

        # the adapters' view: LoadedModel.engine / .embedder on the serving version
        async def use() -> tuple[str, tuple[np.ndarray, int]]:
            engine = srv.server.manager.resolve("tiny-qwen").model.engine
            ids = engine.apply_chat_template([{"role": "user", "content": "hi"}])
            text = ""
            async for chunk in engine.generate(GenerationRequest("x", ids, SamplingParams(max_tokens=8))):
                text += chunk.text
            embedder = srv.server.manager.resolve("tiny-bert").model.embedder
            return text, await embedder.embed(["one text", [5, 6, 7]])

        _, (vectors, n_tokens) = srv.call(use())
        assert vectors.shape == (2, 32) and n_tokens == len(
            srv.server.manager.resolve("tiny-bert").model.embedder.tokenizer.encode("one text")) + 3


def test_embedder_rejects_bad_input(llm_repo: Path) -> None:
    with run_server(llm_repo, load="tiny-bert") as srv:
        embedder = srv.server.manager.resolve("tiny-bert").model.embedder
        for bad, match in (([], "empty"), (["x " * 600], "maximum context length is 512 tokens"),
                           ([[10**9]], "Token ids"), ([3.5], "string or a list")):
            with pytest.raises(InvalidRequestError, match=match):
                srv.call(embedder.embed(bad))


def test_bad_llm_models_fail_with_codes(llm_repo: Path, llm_models: dict[str, Path], tmp_path: Path) -> None:
    write_llm_model(llm_repo, "no-source", tmp_path / "missing")
    write_llm_model(llm_repo, "too-small-cache", llm_models["llama"], {"engine": {"kv_cache_bytes": 1024}})
    write_llm_model(llm_repo, "wrong-task", llm_models["llama"], {"task": "classification"})
    with run_server(llm_repo, load="none") as srv, srv.client(timeout=120) as c:
        for name, code, status in (("no-source", 1005, 422), ("too-small-cache", 1003, 507),
                                   ("wrong-task", 1005, 422)):
            r = c.post(f"/v2/repository/models/{name}/load")
            assert r.status_code == status, r.text
            assert str(code) in r.text
        # the server stays up and serves other models
        assert c.post("/v2/repository/models/tiny-llama/load").status_code == 200
        assert c.get("/v2/models/tiny-llama/ready").status_code == 200


def test_unload_stops_the_engine(llm_repo: Path) -> None:
    with run_server(llm_repo, load="tiny-llama") as srv, srv.client(timeout=120) as c:
        engine = srv.server.manager.resolve("tiny-llama").model.engine
        assert c.post("/v2/repository/models/tiny-llama/unload").status_code == 200
        srv.call(srv.server.manager.settle())
        ids = [1, 2, 3]

        async def after() -> None:
            async for _ in engine.generate(GenerationRequest("late", ids, SamplingParams(max_tokens=2))):
                pass

        with pytest.raises(ModelNotReadyError):
            srv.call(after())
        assert not any(t.name.startswith("inhouse-engine-tiny-llama") for t in threading.enumerate())
