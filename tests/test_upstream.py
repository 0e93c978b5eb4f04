"""``backend: upstream`` between two real inhouse servers on loopback: a front server (keys on)
whose models are served by a back server (TLS with the test CA, keys on, payload audit). v2 and
OpenAI chat through the front to the back; keys on both; the timeout, connect-error retries, the
circuit opening and closing; overflow from a saturated local model and its fallback when the back
server is gone; ``pii.outbound``."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as tgrpc
import yaml

import gate_backend  # noqa: F401  (registers backend: gate)
from certs import Pki, make_pki
from conftest import RunningServer, run_server, wait_until
from gate_backend import GATES
from inhouse.security.audit import AuditLog
from inhouse.security.keys import KeyStore
from llm_fixtures import write_llm_model
from models import identity_model, mlp_model, write_model

EMAIL = "jane.doe@example.com"
PHONE = "13812345678"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Forwarder:
    """A loopback TCP relay to ``target`` that can be switched off (its port refuses
    connections) and on again on the same port: an upstream that goes away and comes back."""

    def __init__(self, target: int) -> None:
        self.port = _free_port()
        self._target = target
        self._server: socket.socket | None = None

    def on(self) -> None:
        srv = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def off(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):  # wakes the accepting thread (close alone would not)
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            self._server = None

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _spec(root: Path, name: str, doc: dict[str, Any]) -> None:
    (root / name / "1").mkdir(parents=True, exist_ok=True)
    (root / name / "model.yaml").write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))


def _gate(x: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [x, 0.0]}]}


def _texts(*texts: str) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, len(texts)], "datatype": "BYTES", "data": list(texts)}]}


ZEROS = {"inputs": [{"name": "features", "shape": [1, 32], "datatype": "FP32", "data": [0.0] * 32}]}


def _code(r: httpx.Response) -> int:
    return int(r.headers["inhouse-error-code"])


@dataclass
class Pair:
    front: RunningServer
    back_url: str
    back_key: str
    key: str  # the front server's key for clients
    back_data: Path
    start_back: Any  # () -> context manager starting the back server on its port again
    relay: Forwarder  # to the back server, for remote-retry
    stack: ExitStack
    back_stack: ExitStack

    def client(self, **kw: Any) -> httpx.Client:
        return self.front.client(headers={"x-api-key": self.key}, **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, llm_models: dict[str, Path]) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("upstream")
    pki: Pki = make_pki(tmp / "pki")
    back_repo, front_repo = tmp / "back" / "models", tmp / "front" / "models"
    back_repo.mkdir(parents=True)
    front_repo.mkdir(parents=True)
    back_data, front_data = tmp / "back" / "data", tmp / "front" / "data"
    store = KeyStore(back_data)
    back_key = store.create("front-server", ["infer"])[0]
    store.close()
    store = KeyStore(front_data)
    key = store.create("app", ["infer", "admin"])[0]
    store.close()
    (tmp / "back.key").write_text(back_key + "\n")

    write_model(back_repo, "mlp", mlp_model())
    write_model(back_repo, "echo", identity_model(8))  # BYTES identity: shows what the upstream got
    _spec(back_repo, "gateb", {"backend": "gate"})
    _spec(back_repo, "slowb", {"backend": "gate"})
    write_llm_model(back_repo, "tiny-llama", llm_models["llama"], {"max_model_len": 512,
                                                                  "engine": {"max_num_seqs": 4}})
    port = _free_port()
    back_url = f"https://127.0.0.1:{port}"

    def start_back() -> Any:
        return run_server(back_repo, http_port=port, auth=True, audit_payloads=True,
                          data_dir=back_data, tls_cert=pki.server.cert, tls_key=pki.server.key)

    up = {"url": back_url, "api_key_file": str(tmp / "back.key"), "tls": {"ca_file": str(pki.ca.cert)},
          "health_interval_s": 60}
    _spec(front_repo, "remote-mlp", {"backend": "upstream", "upstream": {
        **up, "model": "mlp", "retries": 0, "circuit": {"failures": 2, "reset_s": 1.0}}})
    _spec(front_repo, "remote-echo", {"backend": "upstream", "upstream": {**up, "model": "echo"}})
    _spec(front_repo, "remote-refuse", {"backend": "upstream", "pii": {"outbound": "refuse"},
                                        "upstream": {**up, "model": "echo"}})
    _spec(front_repo, "remote-slow", {"backend": "upstream", "upstream": {
        **up, "model": "slowb", "timeout_s": 0.5, "retries": 3, "circuit": {"failures": 50}}})
    relay = Forwarder(port)
    relay.on()
    _spec(front_repo, "remote-retry", {"backend": "upstream", "upstream": {
        **up, "url": f"https://127.0.0.1:{relay.port}", "model": "mlp", "retries": 10, "connect_timeout_s": 1,
        "circuit": {"failures": 50}}})
    _spec(front_repo, "remote-gate", {"backend": "upstream", "upstream": {
        **up, "model": "gateb", "retries": 0, "circuit": {"failures": 1, "reset_s": 60}}})
    _spec(front_repo, "remote-health", {"backend": "upstream", "upstream": {
        **up, "model": "mlp", "health_interval_s": 0.2, "circuit": {"failures": 100, "reset_s": 60}}})
    _spec(front_repo, "remote-chat", {"backend": "upstream", "task": "chat", "upstream": {
        **up, "protocol": "openai", "model": "tiny-llama"}})
    _spec(front_repo, "remote-nocert", {"backend": "upstream", "upstream": {
        "url": back_url, "api_key_file": str(tmp / "back.key"), "model": "mlp"}})
    write_llm_model(front_repo, "local-chat", llm_models["llama"], {
        "max_model_len": 1024, "engine": {"max_num_seqs": 2},
        "overflow": {"to": "remote-chat", "when": {"queue_above": 0}}})
    _spec(front_repo, "locala", {"backend": "gate", "overflow": {
        "to": "remote-gate", "when": {"queue_above": 0}, "fallback": "fallbacka"}})
    _spec(front_repo, "fallbacka", {"backend": "gate"})
    _spec(front_repo, "localw", {"backend": "gate", "overflow": {
        "to": "remote-gate", "when": {"predicted_wait_ms_above": 0.5}}})

    stack, back_stack = ExitStack(), ExitStack()
    with stack, back_stack:
        back = back_stack.enter_context(start_back())
        front = stack.enter_context(run_server(front_repo, auth=True, data_dir=front_data))
        yield Pair(front, back.url, back_key, key, back_data, start_back, relay, stack, back_stack)
    relay.off()


def test_v2_through_the_front_matches_a_direct_call(pair: Pair) -> None:
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    body = {"inputs": [{"name": "features", "shape": [3, 32], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with pair.client() as c, httpx.Client(base_url=pair.back_url, verify=False, timeout=30) as direct:
        r = c.post("/v2/models/remote-mlp/infer", json=body)
        assert r.status_code == 200, r.text
        want = direct.post("/v2/models/mlp/infer", json=body, headers={"x-api-key": pair.back_key})
        assert want.status_code == 200
        got = r.json()["outputs"][0]
        assert got["name"] == "probabilities" and got["shape"] == [3, 2]
        assert np.allclose(got["data"], want.json()["outputs"][0]["data"], atol=1e-6)
        # the upstream's tensors are this model's, read from the upstream's metadata at load
        meta = c.get("/v2/models/remote-mlp").json()
        assert meta["platform"] == "upstream" and meta["inputs"][0]["name"] == "features"
    # gRPC clients of the front server reach it too (tritonclient, the key as call metadata)
    grpc_client = tgrpc.InferenceServerClient(pair.front.grpc_target)
    inp = tgrpc.InferInput("features", [3, 32], "FP32")
    inp.set_data_from_numpy(x)
    res = grpc_client.infer("remote-mlp", [inp], headers={"x-api-key": pair.key})
    assert np.allclose(res.as_numpy("probabilities"), np.array(want.json()["outputs"][0]["data"]).reshape(3, 2),
                       atol=1e-6)
    grpc_client.close()


def test_keys_front_checked_and_upstream_key_never_shown(pair: Pair) -> None:
    with pair.front.client() as anon, pair.client() as c:
        r = anon.post("/v2/models/remote-mlp/infer", json=_texts("x"))
        assert r.status_code == 401 and _code(r) == 4001
        # the back server's key opens nothing on the front server
        r = anon.get("/v2/models/remote-mlp", headers={"x-api-key": pair.back_key})
        assert r.status_code == 401
        seen = [c.get("/v2/models/remote-mlp/config").text, c.post("/v2/repository/index").text,
                c.post("/v2/models/remote-mlp/infer", json=_texts("x")).text,
                c.get("/v2/models/remote-mlp").text]
        assert all(pair.back_key not in s for s in seen)
        assert "back.key" in seen[0]  # the file is named, its content is not


def test_openai_chat_through_the_front(pair: Pair) -> None:
    front = openai.OpenAI(base_url=pair.front.url + "/v1", api_key=pair.key, max_retries=0)
    direct = openai.OpenAI(base_url=pair.back_url + "/v1", api_key=pair.back_key, max_retries=0,
                           http_client=httpx.Client(verify=False))
    msgs: Any = [{"role": "user", "content": "Say something."}]
    got = front.chat.completions.create(model="remote-chat", messages=msgs, max_tokens=8, temperature=0)
    want = direct.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].finish_reason == want.choices[0].finish_reason
    assert got.usage is not None and want.usage is not None
    assert got.usage.completion_tokens == want.usage.completion_tokens
    stream = front.chat.completions.create(model="remote-chat", messages=msgs, max_tokens=8, temperature=0,
                                           stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == want.choices[0].message.content
    # the other LLM APIs of the front server reach it too
    anth = anthropic.Anthropic(base_url=pair.front.url, api_key=pair.key, max_retries=0)
    m = anth.messages.create(model="remote-chat", max_tokens=8, messages=msgs, extra_body={"temperature": 0})
    assert m.content[0].type == "text" and m.content[0].text == want.choices[0].message.content
    with pair.client() as c:
        r = c.post("/api/chat", json={"model": "remote-chat", "messages": msgs, "stream": False,
                                      "options": {"num_predict": 8, "temperature": 0}})
        assert r.status_code == 200 and r.json()["message"]["content"] == want.choices[0].message.content, r.text
        r = c.post("/v2/models/remote-chat/generate", json={
            "messages": json.dumps(msgs), "parameters": {"max_tokens": 8, "temperature": 0}})
        assert r.status_code == 200 and r.json()["text_output"] == want.choices[0].message.content, r.text
        r = c.post("/v1/completions", json={"model": "remote-chat", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 400 and "chat requests only" in r.text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=pair.front.url + "/v1", api_key=pair.back_key, max_retries=0).chat.completions.create(
            model="remote-chat", messages=msgs, max_tokens=2)


def test_chat_overflow_engages_while_busy_and_stops_after(pair: Pair) -> None:
    front = openai.OpenAI(base_url=pair.front.url + "/v1", api_key=pair.key, max_retries=0)
    msgs: Any = [{"role": "user", "content": "Say something."}]
    pending = pair.front.server.llm._pending
    before = len(_back_entries(pair.back_data, "tiny-llama"))
    long = front.chat.completions.create(model="local-chat", messages=msgs, max_tokens=900, stream=True,
                                         extra_body={"ignore_eos": True})
    next(iter(long))  # the local model is busy with it
    assert pending.get("local-chat") == 1
    r = front.chat.completions.create(model="local-chat", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None and r.usage is not None
    assert r.usage.completion_tokens <= 4
    wait_until(lambda: len(_back_entries(pair.back_data, "tiny-llama")) == before + 1)  # sent upstream
    long.close()
    wait_until(lambda: pending.get("local-chat") == 0)
    front.chat.completions.create(model="local-chat", messages=msgs, max_tokens=4, temperature=0)
    time.sleep(0.3)
    assert len(_back_entries(pair.back_data, "tiny-llama")) == before + 1  # drained: answered here


def _back_entries(data: Path, model: str) -> list[dict[str, Any]]:
    audit = AuditLog(data)
    try:
        return [e for e in audit.entries() if e["model"] == model]
    finally:
        audit.close()


def test_pii_outbound_redacts_and_restores(pair: Pair) -> None:
    text = f"mail {EMAIL} or call {PHONE}"
    with pair.client() as c:
        r = c.post("/v2/models/remote-echo/infer", json=_texts(text, "plain"), headers={"x-request-id": "pii-1"})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [text, "plain"]  # the originals, put back here
        r = c.post("/v2/models/remote-refuse/infer", json=_texts(text))
        assert r.status_code == 400 and _code(r) == 5001 and "email" in r.json()["error"]
    # what the upstream saw and recorded: placeholders (its own audit redaction would write [EMAIL])
    wait_until(lambda: _back_details(pair.back_data, "echo"), timeout=10)
    details = _back_details(pair.back_data, "echo")
    assert any("[EMAIL_1]" in d and "[PHONE_1]" in d for d in details), details
    assert not any(EMAIL in d or PHONE in d for d in details)


def _back_details(data: Path, model: str) -> list[str]:
    audit = AuditLog(data)
    try:
        return [str(e["detail"]) for e in audit.entries() if e["model"] == model and e["detail"]]
    finally:
        audit.close()


def test_timeout_is_not_retried(pair: Pair) -> None:
    gate = GATES["slowb"]
    gate.hold()
    try:
        with pair.client() as c:
            started = time.monotonic()
            r = c.post("/v2/models/remote-slow/infer", json=_gate(7.0))
            took = time.monotonic() - started
        assert r.status_code == 504 and _code(r) == 3002 and "not retried" in r.json()["error"], r.text
        assert took < 5
    finally:
        gate.open.set()
    wait_until(lambda: gate.executed_ids().count(7.0) == 1)
    time.sleep(0.3)
    assert gate.executed_ids().count(7.0) == 1  # sent once: a request that may have run is never resent


def test_tls_needs_the_ca(pair: Pair) -> None:
    with pair.client() as c:
        entries = {e["name"]: e for e in c.post("/v2/repository/index").json()}
    assert entries["remote-nocert"]["state"] == "FAILED"
    assert entries["remote-nocert"]["reason"] and "ConnectError" in entries["remote-nocert"]["reason"]
    assert entries["remote-mlp"]["state"] == "READY"


def _busy(c: httpx.Client, pool: ThreadPoolExecutor, model: str, ids: list[float]) -> list[Future[httpx.Response]]:
    return [pool.submit(c.post, f"/v2/models/{model}/infer", json=_gate(i)) for i in ids]


@pytest.mark.parametrize(("model", "base"), [("locala", 0.0), ("localw", 100.0)])
def test_overflow_engages_when_full_and_stops_when_drained(pair: Pair, model: str, base: float) -> None:
    """queue_above: 0 (one request queued is past it); predicted_wait_ms_above: 0.5 (one queued
    request is predicted to wait a call's time, 1 ms before any call was measured)."""
    local, remote = GATES[model], GATES["gateb"]
    local.hold()
    with pair.client() as c, ThreadPoolExecutor(4) as pool:
        try:
            running = _busy(c, pool, model, [base + 1.0])
            assert local.entered.acquire(timeout=10)  # the instance is busy
            queued = _busy(c, pool, model, [base + 2.0])
            wait_until(lambda: pair.front.server.manager.resolve(model).scheduler.queue_depth() == 1)
            r = c.post(f"/v2/models/{model}/infer", json=_gate(base + 3.0))  # past the rule: to the upstream
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [(base + 3.0) * 2, 0.0]
            assert remote.executed_ids().count(base + 3.0) == 1 and base + 3.0 not in local.executed_ids()
        finally:
            local.open.set()
        assert all(f.result(10).status_code == 200 for f in running + queued)
        r = c.post(f"/v2/models/{model}/infer", json=_gate(base + 4.0))  # drained: served here again
        assert r.status_code == 200 and base + 4.0 in local.executed_ids()
        assert base + 4.0 not in remote.executed_ids()


def test_upstream_down_circuit_fallback_retry_and_recovery(pair: Pair) -> None:
    local, fallback = GATES["locala"], GATES["fallbacka"]
    pair.back_stack.close()  # the back server goes away
    pair.relay.off()
    with pair.client() as c, ThreadPoolExecutor(4) as pool:
        # connect errors: 3006 with the reason; after circuit.failures of them the circuit opens
        for _ in range(2):
            r = c.post("/v2/models/remote-mlp/infer", json=ZEROS)
            assert r.status_code == 503 and _code(r) == 3006, r.text
            assert "ConnectionRefusedError connecting to" in r.json()["error"]
        r = c.post("/v2/models/remote-mlp/infer", json=ZEROS)
        assert r.status_code == 503 and _code(r) == 3006 and "circuit is open" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        entries = {e["name"]: e for e in c.post("/v2/repository/index").json()}
        assert entries["remote-mlp"]["state"] == "FAILED" and "Refused" in entries["remote-mlp"]["reason"]
        assert c.get("/v2/models/remote-mlp/ready").status_code != 200

        def health() -> dict[str, Any]:
            return {e["name"]: e for e in c.post("/v2/repository/index").json()}["remote-health"]

        # the periodic health check opens a circuit that no request has opened
        wait_until(lambda: health()["state"] == "FAILED", timeout=10)
        assert "health check failed" in health()["reason"]
        r = c.post("/v2/models/remote-health/infer", json=ZEROS)
        assert r.status_code == 503 and _code(r) == 3006 and "health check failed" in r.json()["error"]

        # overflow while the upstream is down: the fallback answers
        local.hold()
        try:
            running = _busy(c, pool, "locala", [11.0])
            assert local.entered.acquire(timeout=10)
            queued = _busy(c, pool, "locala", [12.0])
            wait_until(lambda: pair.front.server.manager.resolve("locala").scheduler.queue_depth() == 1)
            r = c.post("/v2/models/locala/infer", json=_gate(13.0))
            assert r.status_code == 200, r.text
            assert fallback.executed_ids() == [13.0]
        finally:
            local.open.set()
        assert all(f.result(10).status_code == 200 for f in running + queued)

        # a request sent while its upstream refuses connections is retried until the upstream is back
        pair.back_stack.enter_context(pair.start_back())
        retried = pool.submit(c.post, "/v2/models/remote-retry/infer", json=ZEROS)
        time.sleep(0.5)
        assert not retried.done(), retried.result().text  # still retrying: the relay refuses connections
        pair.relay.on()
        r = retried.result(30)
        assert r.status_code == 200, r.text

        wait_until(lambda: health()["state"] == "READY", timeout=10)  # a passing check closes it
        assert c.post("/v2/models/remote-health/infer", json=ZEROS).status_code == 200

        # the circuit lets a trial through after reset_s, and closes on its success
        time.sleep(1.0)
        r = c.post("/v2/models/remote-mlp/infer", json=ZEROS)
        assert r.status_code == 200, r.text
        entries = {e["name"]: e for e in c.post("/v2/repository/index").json()}
        assert entries["remote-mlp"]["state"] == "READY"
        assert c.get("/v2/models/remote-mlp/ready").status_code == 200


def test_spec_errors_are_clear(tmp_path: Path) -> None:
    from inhouse.core.spec import parse_spec
    from inhouse.errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="backend: upstream and an 'upstream' section go together"):
        parse_spec({"name": "m", "backend": "upstream"}, "model.yaml")
    with pytest.raises(ModelSpecError, match="api_key_env or api_key_file, not both"):
        parse_spec({"name": "m", "backend": "upstream", "upstream": {
            "url": "https://x", "api_key_env": "A", "api_key_file": "f"}}, "model.yaml")
    with pytest.raises(ModelSpecError, match="queue_above or predicted_wait_ms_above"):
        parse_spec({"name": "m", "overflow": {"to": "r", "when": {}}}, "model.yaml")
    spec = parse_spec({"name": "m", "backend": "upstream", "upstream": {"url": "https://x"}}, "model.yaml")
    assert spec.instances.count == 8 and spec.upstream is not None and spec.upstream.retries == 2
    json.dumps(spec.model_dump(mode="json"))
