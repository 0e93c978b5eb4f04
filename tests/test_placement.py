"""``placement`` with ``inhouse serve --workers 2``: a chat LLM (tiny built-in-engine model) and an
ONNX model marked ``placement: one`` are held by one worker, the small ONNX model by each. Every
worker answers for every model: its stand-in routes engine-level calls to the owner, while keys,
audit and metrics stay in the worker the client reached. The tests share one server, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import psutil
import pytest
import tritonclient.grpc as tgrpc

from conftest import wait_until
from inhouse.core.manager import ModelManager
from inhouse.core.repository import ModelRepository
from inhouse.core.spec import ModelSpec
from inhouse.security.keys import KeyStore
from inhouse.settings import usable_cores
from inhouse.workers.placement import WorkerPlacement, owner_of, placement_of
from llm_fixtures import write_llm_model
from models import mlp_model, write_model
from test_llamacpp import _write as write_gguf
from test_llamacpp import llama_server, tiny_gguf  # noqa: F401 (fixtures)
from test_workers import _free_port

pytestmark = pytest.mark.timeout(300)

CONNECTIONS = 16  # fresh connections per check: all on one worker by chance is 2**-15
CHAT = "chat"
GGUF = "gguf"  # held by the other worker than CHAT (see test_the_owner_is_the_same_in_every_process)
ENCODER = "encoder"  # held by CHAT's owner: the other worker maps no torch at all
MESSAGES = [{"role": "user", "content": "Hello there, how are you?"}]


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    grpc_target: str
    data: Path
    log: Path
    admin: str
    has_gguf: bool
    repo: Path

    def children(self) -> set[int]:
        return {int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()}

    def client(self) -> httpx.Client:
        """A fresh connection, and the pid of the worker that holds it."""
        return httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {self.admin}"}, timeout=60)

    def per_connection(self, method: str, path: str, **kw: Any) -> list[tuple[int, httpx.Response]]:
        out = []
        for _ in range(CONNECTIONS):
            with self.client() as c:
                pid = int(c.get("/v2").json()["worker"]["pid"])
                out.append((pid, c.request(method, path, **kw)))
        return out

    def owner_pid(self) -> int:
        """The worker that holds the chat model: the one whose metadata is not a stand-in's."""
        for _ in range(50):
            with self.client() as c:
                pid = int(c.get("/v2").json()["worker"]["pid"])
                meta = c.get(f"/v2/models/{CHAT}")
                if meta.status_code == 200 and "(worker" not in meta.json()["platform"]:
                    return pid
        raise AssertionError("no worker holds the chat model")

    def wait_served(self, exclude: frozenset[int] = frozenset(), model: str = CHAT) -> set[int]:
        """Until both workers (none of ``exclude``) are ready to serve ``model``."""
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            seen: set[int] = set()
            try:
                for _ in range(CONNECTIONS):
                    with self.client() as c:  # the model, and the worker's start-up loads all done
                        pid = int(c.get("/v2").json()["worker"]["pid"])
                        if (c.get(f"/v2/models/{model}/ready").status_code == 200
                                and c.get("/v2/health/ready").status_code == 200 and pid not in exclude):
                            seen.add(pid)
            except (httpx.TransportError, KeyError, ValueError):
                pass  # not listening yet
            if len(seen) == 2:
                return seen
            time.sleep(0.3)
        raise AssertionError(f"the workers never served {model}:\n{self.log.read_text()[-4000:]}")


def _gguf(request: pytest.FixtureRequest) -> Path | None:
    """The tiny GGUF of test_llamacpp.py; None where llama.cpp is not built (CI=true fails instead)."""
    try:
        path: Path = request.getfixturevalue("tiny_gguf")
    except pytest.skip.Exception:
        return None
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path],
           request: pytest.FixtureRequest) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("placement")
    repo, data = root / "models", root / "data"
    gguf = _gguf(request)
    if gguf is not None:
        write_gguf(repo, GGUF, gguf, {"parallel": 2, "ctx_size": 1024})
    write_llm_model(repo, CHAT, llm_models["llama"], {"max_model_len": 512,
                                                      "engine": {"max_num_seqs": 2, "max_num_batched_tokens": 512}})
    write_model(repo, "mlp", mlp_model())
    write_llm_model(repo, ENCODER, llm_models["bert"], {"task": "embedding", "placement": "one"})
    write_model(repo, "big", mlp_model(seed=1), {"placement": "one"})
    write_model(repo, "broken", b"not an onnx graph", {"placement": "one"})  # fails in its owner
    store = KeyStore(data)
    admin = store.create("admin", ["admin", "infer", "metrics"])[0]
    store.close()
    port, grpc_port = _free_port(), _free_port()
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inhouse", "serve", "--repo", str(repo), "--http-port", str(port),
             "--grpc-port", str(grpc_port), "--data-dir", str(data), "--auth", "--workers", "2",
             "--log-format", "json"], stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    s = Served(proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", data, log, admin, gguf is not None, repo)
    try:
        s.wait_served()
        yield s
    finally:
        # read before the supervisor goes: its workers' llama-servers would be re-parented to init
        pids = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} if proc.poll() is None else set()
        if proc.poll() is None:
            proc.terminate()  # the supervisor stops its workers, which stop their engine servers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _spec(**doc: Any) -> ModelSpec:
    return ModelSpec.model_validate({"name": "m", **doc})


def test_default_placement_follows_the_model(tmp_path: Path) -> None:
    small = write_model(tmp_path, "m", mlp_model())
    assert placement_of(_spec(), small, 256) == "each"
    assert placement_of(_spec(), small, 0.001) == "one"  # files over the threshold
    assert placement_of(_spec(placement="each"), small, 0.001) == "each"  # model.yaml wins
    assert placement_of(_spec(placement="one"), small, 256) == "one"
    for backend in ("llamacpp", "vllm"):
        assert placement_of(_spec(backend=backend, task="chat"), small, 256) == "one"
    assert placement_of(_spec(backend="transformers", task="chat"), small, 256) == "one"
    assert placement_of(_spec(backend="transformers", task="embedding"), small, 256) == "each"
    remote = _spec(backend="upstream", task="chat", upstream={"url": "http://gpu:8000"})
    assert placement_of(remote, small, 0.001) == "each"
    with pytest.raises(ValueError, match="placement"):
        _spec(placement="some")


def test_copies_in_every_worker_share_the_cores(tmp_path: Path) -> None:
    """Each worker's copy of a model placed on each gets its share of the cores (N workers with
    onnxruntime's thread per core would put N threads on every core); a model held by one worker
    keeps them all, and model.yaml's ``intra_op_threads`` wins."""
    repo = tmp_path / "repo"
    write_model(repo, "each", mlp_model())
    write_model(repo, "one", mlp_model(), {"placement": "one"})
    write_model(repo, "set", mlp_model(), {"onnxruntime": {"intra_op_threads": 3}})

    def threads(count: int) -> dict[str, int]:
        async def run() -> dict[str, int]:
            repository = ModelRepository(repo)
            placement = WorkerPlacement(repository, tmp_path, owner_of("one", count), count, 256)
            manager = ModelManager(repository, placement=placement)
            try:
                out = {}
                for name in ("each", "one", "set"):
                    await manager.load(name)
                    session = manager.resolve(name).model.session
                    out[name] = session.get_session_options().intra_op_num_threads
                return out
            finally:
                await manager.close()

        return asyncio.run(run())

    assert threads(1) == {"each": 0, "one": 0, "set": 3}  # one process: onnxruntime's own default
    assert threads(2) == {"each": max(1, usable_cores() // 2), "one": 0, "set": 3}
    assert threads(4) == {"each": max(1, usable_cores() // 4), "one": 0, "set": 3}


def _torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_only_the_owner_holds_the_llm(served: Served) -> None:
    owner = served.owner_pid()
    pids = served.children()
    assert len(pids) == 2 and owner in pids
    assert _torch_loaded(owner)
    assert not any(_torch_loaded(p) for p in pids - {owner})  # the stand-in holds no weights, no torch
    meta = served.per_connection("GET", "/v2/models/mlp")
    assert all("(worker" not in r.json()["platform"] for _, r in meta)  # each: a copy in every worker
    big = served.per_connection("GET", "/v2/models/big")
    assert {("(worker" in r.json()["platform"]) for _, r in big} == {True, False}


def _llama_servers(pid: int) -> list[int]:
    """llama-server processes started by ``pid`` (from any of its threads)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"llama-server" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def test_one_llama_server_for_every_worker(served: Served) -> None:
    if not served.has_gguf:
        pytest.skip("llama-server is not built; run: bash scripts/build_llama_server.sh")
    children = {w: _llama_servers(w) for w in served.children()}
    assert sorted(len(c) for c in children.values()) == [0, 1], children  # exactly one, in one worker
    answers: dict[int, set[str]] = {}
    for i in range(3 * CONNECTIONS):
        if i >= CONNECTIONS // 2 and len(answers) == 2:
            break
        with served.client() as http:
            pid = int(http.get("/v2").json()["worker"]["pid"])
            r = http.post("/v1/chat/completions", json={"model": GGUF, "messages": MESSAGES, "max_tokens": 6,
                                                        "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 6
            answers.setdefault(pid, set()).add(r.json()["choices"][0]["message"]["content"])
    assert len(answers) == 2 and len(set().union(*answers.values())) == 1, answers
    # a JSON schema crosses as the schema: llama-server enforces it in the owner
    with served.client() as http:
        for _ in range(4):
            r = http.post("/v1/chat/completions", json={
                "model": GGUF, "messages": MESSAGES, "max_tokens": 40, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
                    "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}})
            assert r.status_code == 200, r.text
            assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["n"], int)
    # the child's own metrics, read in the owner, come once in the sum over the workers
    def predicted() -> list[str]:
        with served.client() as http:
            text = http.get("/metrics").text
        return [line for line in text.splitlines()
                if line.startswith("inhouse_llamacpp_tokens_predicted_total{") and f'model="{GGUF}"' in line]

    wait_until(lambda: len(predicted()) == 1 and float(predicted()[0].rsplit(" ", 1)[1]) >= 6, timeout=30)


def test_chat_through_every_worker(served: Served) -> None:
    answers: dict[int, set[str]] = {}
    for i in range(CONNECTIONS):
        with served.client() as http:
            pid = int(http.get("/v2").json()["worker"]["pid"])
            c = openai.OpenAI(base_url=served.url + "/v1", api_key=served.admin, http_client=http, max_retries=0)
            if i % 2:
                chat = c.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                                 temperature=0, extra_body={"ignore_eos": True})
                text = chat.choices[0].message.content or ""
                assert chat.usage is not None and chat.usage.completion_tokens == 8
            else:
                stream = c.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=8,  # type: ignore[arg-type]
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
                text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            answers.setdefault(pid, set()).add(text)
    assert len(answers) == 2, answers  # both workers answered
    assert len({t for texts in answers.values() for t in texts}) == 1, answers  # the same greedy answer
    assert next(iter(next(iter(answers.values()))))


def test_json_schema_crosses_to_the_owner(served: Served) -> None:
    """The constraint is rebuilt from its schema in the owner (llguidance for the built-in engine)."""
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}
    with _through_stand_in(served) as http:
        c = openai.OpenAI(base_url=served.url + "/v1", api_key=served.admin, http_client=http, max_retries=0)
        for seed in (1, 2):
            r = c.chat.completions.create(
                model=CHAT, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed,  # type: ignore[arg-type]
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
            jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def _grpc_stream(client: Any, text: str, headers: dict[str, str]) -> tuple[str, Any]:
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)), headers=headers)
    try:
        t = tgrpc.InferInput("messages", [1], "BYTES")
        t.set_data_from_numpy(np.array([text.encode()], dtype=object))
        client.async_stream_infer(CHAT, [t], request_id="s", parameters={"max_tokens": 6, "temperature": 0.0,
                                                                          "ignore_eos": True},
                                  enable_empty_final_response=False)
        pieces = []
        while True:
            result, error = got.get(timeout=60)
            assert error is None, str(error)
            pieces.append(result.as_numpy("text_output")[0].decode())
            final = result.get_response()
            if final.parameters["triton_final_response"].bool_param:
                return "".join(pieces), final
    finally:
        client.stop_stream()


def test_grpc_generate_stream_and_infer_through_every_worker(served: Served) -> None:
    texts: dict[bool, set[str]] = {}
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    outputs: dict[bool, list[np.ndarray]] = {}
    auth = {"authorization": f"Bearer {served.admin}"}
    for i in range(3 * CONNECTIONS):
        if i >= CONNECTIONS // 2 and len(texts) == 2 and len(outputs) == 2:
            break
        # a connection of its own (gRPC would share one between channels to the same target)
        client = tgrpc.InferenceServerClient(served.grpc_target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        try:
            stand_in = "(worker" in client.get_model_metadata(CHAT, headers=auth).platform
            text, final = _grpc_stream(client, json.dumps(MESSAGES), auth)
            assert final.parameters["completion_tokens"].int64_param == 6
            texts.setdefault(stand_in, set()).add(text)
            big_stand_in = "(worker" in client.get_model_metadata("big", headers=auth).platform
            inp = tgrpc.InferInput("features", [3, 32], "FP32")
            inp.set_data_from_numpy(x)
            out = client.infer("big", [inp], headers=auth).as_numpy("probabilities")
            outputs.setdefault(big_stand_in, []).append(out)
        finally:
            client.close()
    assert set(texts) == {True, False} and len(texts[True] | texts[False]) == 1, texts
    assert set(outputs) == {True, False}
    first = outputs[False][0]
    assert all(np.allclose(o, first) for o in outputs[True] + outputs[False])
    rest = served.per_connection("POST", "/v2/models/big/infer", json={
        "inputs": [{"name": "features", "shape": [3, 32], "datatype": "FP32", "data": x.ravel().tolist()}]})
    assert len({pid for pid, _ in rest}) == 2
    assert all(np.allclose(np.array(r.json()["outputs"][0]["data"]).reshape(3, 2), first) for _, r in rest)


def test_embeddings_through_every_worker(served: Served) -> None:
    vectors: dict[bool, list[list[float]]] = {}
    for i in range(3 * CONNECTIONS):
        if i >= CONNECTIONS // 2 and len(vectors) == 2:
            break
        with served.client() as http:
            stand_in = "(worker" in http.get(f"/v2/models/{ENCODER}").json()["platform"]
            c = openai.OpenAI(base_url=served.url + "/v1", api_key=served.admin, http_client=http, max_retries=0)
            out = c.embeddings.create(model=ENCODER, input=["hello world", "the weather"])
            assert out.usage.prompt_tokens > 0 and len(out.data) == 2
            vectors.setdefault(stand_in, []).extend(d.embedding for d in out.data[:1])
    assert set(vectors) == {True, False}, vectors.keys()
    first = vectors[False][0]
    assert all(np.allclose(v, first, atol=1e-6) for v in vectors[True] + vectors[False])


def _metric(served: Served, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with served.client() as c:
        text = c.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


@contextlib.contextmanager
def _through_stand_in(served: Served, owner: int | None = None) -> Iterator[httpx.Client]:
    """A connection to the worker that does not hold the chat model."""
    owner = owner or served.owner_pid()
    for _ in range(50):
        with served.client() as c:
            if int(c.get("/v2").json()["worker"]["pid"]) != owner:
                yield c
                return
    raise AssertionError("never reached the worker without the model")


def _has_text(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def test_a_client_leaving_mid_stream_frees_the_owners_slot(served: Served) -> None:
    before = _metric(served, "inhouse_llm_completion_tokens_total", model=CHAT)
    limit = 480
    with _through_stand_in(served) as c:
        body = {"model": CHAT, "messages": MESSAGES, "max_tokens": limit, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert any(_has_text(line) for line in r.iter_lines())  # the first generated token: then leave
    # the owner counts a sequence's tokens when it ends: here, once the cancel reached it
    deadline, last, stable_since = time.time() + 30, before, time.time()
    while time.time() - stable_since < 1.0:
        assert time.time() < deadline, "the owner's sequence never ended"
        now = _metric(served, "inhouse_llm_completion_tokens_total", model=CHAT)
        if now != last or now == before:
            last, stable_since = now, time.time()
        time.sleep(0.1)
    assert 0 < last - before < limit, last - before  # cancelled, not run to the end
    with _through_stand_in(served) as c:  # and the slot is free for the next one
        r = c.post("/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_keys_audit_and_metrics_stay_in_the_worker_reached(served: Served) -> None:
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES, "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 401, r.text  # no key: refused before any call reaches the owner
    chats = _metric(served, "inhouse_http_requests_total", route="/v1/chat/completions", status="200")
    infers = _metric(served, "inhouse_inference_requests_total", model="big")
    batches = _metric(served, "inhouse_batch_size_count", model="big")
    x = np.ones((1, 32), np.float32)
    body = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    sent = served.per_connection("POST", "/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES,
                                                                       "max_tokens": 2})
    sent += served.per_connection("POST", "/v2/models/big/infer", json=body)
    assert len({pid for pid, _ in sent}) == 2 and all(r.status_code == 200 for _, r in sent), sent
    # each request counted once, by the worker the client reached, though the owner ran it
    assert _metric(served, "inhouse_http_requests_total", route="/v1/chat/completions",
                   status="200") - chats == CONNECTIONS
    assert _metric(served, "inhouse_inference_requests_total", model="big") - infers == CONNECTIONS
    assert 0 < _metric(served, "inhouse_batch_size_count", model="big") - batches <= CONNECTIONS  # the owner's
    done = subprocess.run([sys.executable, "-m", "inhouse", "audit", "verify", "--data-dir", str(served.data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    entries = int(re.search(r"(\d+) audit entries", done.stdout + done.stderr).group(1))  # type: ignore[union-attr]
    assert entries >= 4 * CONNECTIONS, done.stdout  # every request here and above, whichever worker it reached


def _index(served: Served, name: str) -> dict[int, list[tuple[str, str]]]:
    out: dict[int, list[tuple[str, str]]] = {}
    for pid, r in served.per_connection("POST", "/v2/repository/index", json={}):
        out[pid] = [(e.get("version", ""), e["state"]) for e in r.json() if e["name"] == name]
    return out


def test_a_load_failed_in_the_owner_is_the_same_failure_everywhere(served: Served) -> None:
    index = {pid: [(e["state"], e["reason"]) for e in r.json() if e["name"] == "broken"]
             for pid, r in served.per_connection("POST", "/v2/repository/index", json={})}
    assert len(index) == 2, index
    (owner_view, stand_in_view) = index.values()
    assert owner_view[0][0] == stand_in_view[0][0] == "FAILED", index
    assert owner_view[0][1] and owner_view[0][1] == stand_in_view[0][1], index  # the owner's reason
    with served.client() as c:
        r = c.post("/v2/repository/models/broken/load")
        assert r.status_code >= 400 and r.json()["error"], r.text


def test_unload_and_load_from_a_worker_without_the_model(served: Served) -> None:
    owner = served.owner_pid()
    with _through_stand_in(served, owner) as c:
        r = c.post(f"/v2/repository/models/{CHAT}/unload")
        assert r.status_code == 200, r.text
    index = _index(served, CHAT)
    assert len(index) == 2 and all(v == [("1", "UNLOADED")] for v in index.values()), index
    with served.client() as c:
        r = c.post("/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 503 and "not loaded" in r.text, r.text
    with _through_stand_in(served, owner) as c:
        r = c.post(f"/v2/repository/models/{CHAT}/load")
        assert r.status_code == 200, r.text
    index = _index(served, CHAT)
    assert len(index) == 2 and all(v == [("1", "READY")] for v in index.values()), index
    served.wait_served()


def test_a_version_switch_of_a_model_held_by_one_worker(served: Served) -> None:
    write_model(served.repo, "big", mlp_model(seed=2), {"placement": "one"}, version=2)
    with _through_stand_in(served) as c:
        r = c.post("/v2/repository/models/big/load")
        assert r.status_code == 200 and r.json()["versions"] == ["2"], r.text
    x = np.ones((1, 32), np.float32)
    body = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    answers = served.per_connection("POST", "/v2/models/big/infer", json=body)
    assert len({pid for pid, _ in answers}) == 2
    assert all(r.status_code == 200 and r.json()["model_version"] == "2" for _, r in answers), answers
    assert len({json.dumps(r.json()["outputs"][0]["data"]) for _, r in answers}) == 1  # the owner's version 2


def test_owner_killed_answers_503_until_restarted(served: Served) -> None:
    owner = served.owner_pid()
    survivors = served.children() - {owner}
    os.kill(owner, signal.SIGKILL)
    codes: set[int] = set()
    deadline = time.time() + 10
    while time.time() < deadline and not codes:
        try:
            with served.client() as c:
                r = c.post("/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES, "max_tokens": 2})
        except httpx.TransportError:
            continue
        if r.status_code != 200:
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            assert "worker" in r.json()["error"]["message"], r.text
            codes.add(r.status_code)
    assert codes == {503}
    for _ in range(20):  # the stand-in's view (a restarted owner may already answer: its own view is LOADING)
        with served.client() as c:
            if int(c.get("/v2").json()["worker"]["pid"]) in survivors:
                index = [e for e in c.post("/v2/repository/index", json={}).json() if e["name"] == CHAT]
                assert [e["state"] for e in index] == ["FAILED"] and "worker" in index[0]["reason"], index
                break
    else:
        raise AssertionError("never reached the worker that stayed")
    served.wait_served(exclude=frozenset({owner}))
    assert served.owner_pid() != owner
    with served.client() as c:
        r = c.post("/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_the_owner_is_the_same_in_every_process() -> None:
    assert {owner_of(CHAT, 2) for _ in range(3)} == {owner_of(CHAT, 2)}
    assert owner_of(GGUF, 2) != owner_of(CHAT, 2) == owner_of(ENCODER, 2)
    assert {owner_of(f"model-{i}", 4) for i in range(64)} == {0, 1, 2, 3}  # spread over the workers


def test_a_killed_owner_leaves_no_llama_server_behind(served: Served) -> None:
    """The supervisor stops the engine server a dead worker left (it is re-parented to it)."""
    if not served.has_gguf:
        pytest.skip("llama-server is not built; run: bash scripts/build_llama_server.sh")
    held = {w: _llama_servers(w) for w in served.children()}
    (owner, (old,)), = [(w, c) for w, c in held.items() if c]
    os.kill(owner, signal.SIGKILL)
    deadline = time.time() + 120
    while True:
        assert time.time() < deadline, f"the killed worker's llama-server runs on:\n{served.log.read_text()[-3000:]}"
        now = {w: _llama_servers(w) for w in served.children() if w != owner}
        if not Path(f"/proc/{old}").exists() and sorted(len(c) for c in now.values()) == [0, 1]:
            break  # the orphan is gone and the restarted worker runs its own
        time.sleep(0.3)
    assert _llama_servers(served.proc.pid) == []  # nothing left re-parented to the supervisor
    served.wait_served(exclude=frozenset({owner}), model=GGUF)
    with served.client() as c:
        r = c.post("/v1/chat/completions", json={"model": GGUF, "messages": MESSAGES, "max_tokens": 2})
        assert r.status_code == 200, r.text
