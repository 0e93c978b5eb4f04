"""``backend: llamacpp``: a tiny random Llama converted to GGUF here, served by a real
``llama-server`` child that inhouse starts, and called through inhouse's own front door with the
official ``openai`` SDK. The binary comes from ``scripts/build_llama_server.sh`` (found through
INHOUSE_LLAMA_SERVER, PATH or the build script's cache folder); under CI=true a missing binary fails
these tests instead of skipping them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningServer, run_server, wait_until
from gguf_fixtures import need_llama_server
from llm_fixtures import build_causal_lm

openai = pytest.importorskip("openai")

MODEL, CANCEL, CRASH, FRAGILE = "tiny-gguf", "tiny-gguf-one-slot", "tiny-gguf-crash", "tiny-gguf-fragile"


def _converter(binary: Path) -> Path:
    """convert_hf_to_gguf.py as the build script keeps it: BIN/../convert/ (or INHOUSE_LLAMA_CONVERT)."""
    named = os.environ.get("INHOUSE_LLAMA_CONVERT")
    path = Path(named) if named else binary.resolve().parent.parent / "convert" / "convert_hf_to_gguf.py"
    if not path.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {path} is missing; .ci/run builds it.")
        pytest.skip(f"{path} is missing; run: bash scripts/build_llama_server.sh")
    return path


# Our trained tokenizer is byte-level BPE with GPT-2's split rule, which the converter cannot
# recognise by its hash (and, for a Llama, would first try to read as SentencePiece), so it is told.
_CONVERT = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import conversion.base as b, conversion.llama as l; "
            "b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'; "
            "l.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2(); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0] + '/convert_hf_to_gguf.py', run_name='__main__')")


@pytest.fixture(scope="session")
def llama_server() -> Path:
    return need_llama_server()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Path:
    """A tiny random Llama with a trained tokenizer and a tool-capable chat template, as f16 GGUF."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    converter = _converter(llama_server)
    root = tmp_path_factory.mktemp("gguf")
    hf = build_causal_lm(root / "hf", "llama", max_len=32768)  # room for a long stream to cancel
    out = root / "tiny-llama-f16.gguf"
    proc = subprocess.run([sys.executable, "-c", _CONVERT, str(converter.parent), str(hf), "--outtype", "f16",
                           "--outfile", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _write(repo: Path, name: str, gguf: Path, llamacpp: dict[str, Any] | None = None,
           **spec: Any) -> Path:
    vdir = repo / name / "1"
    vdir.mkdir(parents=True)
    shutil.copy(gguf, vdir / "model.gguf")
    doc = {"name": name, "backend": "llamacpp", "task": "chat",
           "llamacpp": {"ctx_size": 2048, "parallel": 4, "threads": 1, **(llamacpp or {})}, **spec}
    (repo / name / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return vdir


def _index(srv: RunningServer) -> dict[str, dict[str, Any]]:
    with srv.client() as c:
        return {e["name"]: e for e in c.post("/v2/repository/index", json={}).json()}


def _child(srv: RunningServer, name: str) -> Any:
    return srv.server.manager.resolve(name).model.child  # type: ignore[union-attr]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _llama_children() -> list[str]:
    """Command lines of llama-server processes that are this process's children."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and "llama-server" in cmd:
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def gguf_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, llama_server: Path
                ) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("llamacpp") / "models"
    repo.mkdir()
    _write(repo, MODEL, tiny_gguf)
    _write(repo, CANCEL, tiny_gguf, {"parallel": 1, "ctx_size": 32768})
    _write(repo, CRASH, tiny_gguf, {"parallel": 1})
    _write(repo, FRAGILE, tiny_gguf, {"parallel": 1, "restarts": 0})
    with run_server(repo, llama_server=llama_server) as srv:
        yield srv


def _client(srv: RunningServer, key: str = "none") -> Any:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, timeout=120, max_retries=0)


def test_chat_through_openai_sdk(gguf_server: RunningServer) -> None:
    assert _index(gguf_server)[MODEL]["state"] == "READY"
    client = _client(gguf_server)
    messages = [{"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    assert r.usage is not None and r.usage.prompt_tokens > 4
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.usage.completion_tokens == 8:
        assert choice.finish_reason == "length"

    # the same request streamed: the same greedy text, the same usage
    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == choice.message.content
    assert finish == choice.finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens == r.usage.prompt_tokens


def test_completions_length_and_v2_infer(gguf_server: RunningServer) -> None:
    r = _client(gguf_server).completions.create(model=MODEL, prompt="the weather in Paris", max_tokens=5,
                                                temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    with gguf_server.client(timeout=120) as c:
        meta = c.get(f"/v2/models/{MODEL}").json()
        assert meta["platform"] == "llamacpp"
        r2 = c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
        assert r2.status_code == 200, r2.text
        assert isinstance(r2.json()["outputs"][0]["data"][0], str)


def test_completions_count_reuse_and_echo_the_childs_way(gguf_server: RunningServer) -> None:
    """A text prompt reaches the child as text: usage counts it as the child does, a prompt that
    starts like an earlier one reports the reused tokens (``prompt_tokens_details``), and echo
    repeats the text. A prompt of token ids reports its reused tokens too, which the child tells
    only in its last event."""
    child = _child(gguf_server, MODEL)
    with httpx.Client(transport=child.transport(), base_url="http://llama", headers=child.headers,
                      timeout=60) as raw:
        def tokens(text: str) -> list[int]:
            ids: list[int] = raw.post("/tokenize", json={"content": text, "add_special": True, "parse_special": True}
                                      ).json()["tokens"]
            return ids

        shared = "you answer questions about cities and weather " * 30
        client = _client(gguf_server)
        first = client.completions.create(model=MODEL, prompt=shared + "Paris", max_tokens=2, temperature=0)
        assert first.usage is not None and first.usage.prompt_tokens == len(tokens(shared + "Paris"))
        second = client.completions.create(model=MODEL, prompt=shared + "Tokyo", max_tokens=2, temperature=0,
                                           echo=True)
        assert second.choices[0].text.startswith(shared + "Tokyo")
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached is not None and len(tokens(shared)) // 2 < cached < second.usage.prompt_tokens
        for stream in (False, True):
            ids = tokens(shared + f"Rome {stream}")
            if stream:
                chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
                usage = chunks[-1].usage
            else:
                usage = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0).usage
            assert usage is not None and usage.prompt_tokens == len(ids)
            assert usage.prompt_tokens_details is not None
            assert usage.prompt_tokens_details.cached_tokens is not None
            assert len(tokens(shared)) // 2 < usage.prompt_tokens_details.cached_tokens < len(ids)


def _scrape(srv: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with srv.client(timeout=30) as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text[:300]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_the_childs_metrics_and_its_cache_reuse_reach_metrics(gguf_server: RunningServer) -> None:
    """llama-server's own metrics come out under inhouse's names with the model's labels (read in
    the background: a scrape shows a copy a few seconds old at most), and the prompt tokens the
    child reused count in the prefix-cache counters."""
    ours = (("model", MODEL), ("version", "1"))

    def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
        return samples.get((name, ours), 0.0)

    before = _scrape(gguf_server)
    assert not any(":" in name for name, _ in before)  # nothing under the child's own names
    assert ("inhouse_llamacpp_requests_processing", ours) in before  # read at load
    system = {"role": "system", "content": "you answer questions about rivers and mountains " * 30}
    client = _client(gguf_server)
    prompts = 0
    for city in ("Lyon", "Oslo"):
        r = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": city}],
                                           max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert r.usage is not None
        prompts += r.usage.prompt_tokens
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens
    after = _scrape(gguf_server)
    hits = value(after, "inhouse_llm_prefix_cache_hit_tokens_total") - value(
        before, "inhouse_llm_prefix_cache_hit_tokens_total")
    queried = value(after, "inhouse_llm_prefix_cache_queried_tokens_total") - value(
        before, "inhouse_llm_prefix_cache_queried_tokens_total")
    assert hits >= r.usage.prompt_tokens_details.cached_tokens and queried == prompts
    predicted = "inhouse_llamacpp_tokens_predicted_total"
    wait_until(lambda: value(_scrape(gguf_server), predicted) >= value(before, predicted) + 8, timeout=30)


def test_concurrent_streams_all_complete(gguf_server: RunningServer) -> None:
    client = _client(gguf_server)
    results: dict[int, tuple[str, str | None]] = {}

    def run(i: int) -> None:
        text, finish = [], None
        for chunk in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"question {i} about the city"}],
                max_tokens=24, temperature=0.8, seed=i, stream=True, extra_body={"ignore_eos": True}):
            for c in chunk.choices:
                text.append(c.delta.content or "")
                finish = c.finish_reason or finish
        results[i] = ("".join(text), finish)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(6))
    assert all(finish == "length" for _, finish in results.values())


def test_disconnect_cancels_and_frees_the_slot(gguf_server: RunningServer) -> None:
    """One slot: a stream the client abandons must stop decoding at once, or the next request
    would wait for the rest of its 30,000 tokens."""
    child = _child(gguf_server, CANCEL)
    client = _client(gguf_server)
    with httpx.Client(transport=child.transport(), base_url="http://llama", headers=child.headers,
                      timeout=60) as raw:
        def busy() -> bool:
            return any(s.get("is_processing") for s in raw.get("/slots").json())

        rate = raw.post("/completion", json={"prompt": "hello", "n_predict": 256, "ignore_eos": True}
                        ).json()["timings"]["predicted_per_second"]
        max_tokens = 30000
        stream = client.chat.completions.create(
            model=CANCEL, messages=[{"role": "user", "content": "write a long answer"}], max_tokens=max_tokens,
            temperature=0.8, stream=True, extra_body={"ignore_eos": True})
        for seen, _ in enumerate(stream):
            if seen >= 2:
                break
        assert busy()
        closed = time.monotonic()
        stream.close()
        wait_until(lambda: not busy(), timeout=30)
        freed = time.monotonic() - closed
    # decoding the rest would take at least (max_tokens - a few) / rate seconds
    assert freed < 0.5 * (max_tokens - 1000) / rate, (freed, rate)
    started = time.monotonic()
    r = client.chat.completions.create(model=CANCEL, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - started < 10


def test_a_stream_abandoned_before_its_first_token_is_withdrawn(gguf_server: RunningServer) -> None:
    """One slot, held by a long stream: a second stream waits in the child's queue and nothing of
    it has been sent yet (no headers either: errors before the first token are real statuses).
    Its client gives up. The queued request must be withdrawn then, not run once the slot frees."""
    llm = gguf_server.server.llm
    child = _child(gguf_server, CANCEL)
    client = _client(gguf_server)
    messages = [{"role": "user", "content": "write a long answer"}]
    with httpx.Client(transport=child.transport(), base_url="http://llama", headers=child.headers,
                      timeout=60) as raw:
        def busy() -> bool:
            return any(s.get("is_processing") for s in raw.get("/slots").json())

        holder = client.chat.completions.create(model=CANCEL, messages=messages, max_tokens=30000,
                                                stream=True, extra_body={"ignore_eos": True})
        it = iter(holder)
        next(it), next(it)
        assert busy() and llm._pending.get(CANCEL) == 1
        body = {"model": CANCEL, "messages": messages, "max_tokens": 30000, "stream": True, "ignore_eos": True}
        with (httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as h, pytest.raises(httpx.ReadTimeout),
              h.stream("POST", gguf_server.url + "/v1/chat/completions", json=body) as r):
            r.read()
        # inhouse lets go of it within a poll of the hang-up, while the first stream still runs
        wait_until(lambda: llm._pending.get(CANCEL) == 1, timeout=5)
        holder.close()
        wait_until(lambda: not busy(), timeout=30)
        time.sleep(1.5)  # the child would have started the abandoned request by now
        assert not busy()
        assert llm._pending.get(CANCEL) == 0


def test_unload_stops_the_child(tmp_path: Path, tiny_gguf: Path, llama_server: Path) -> None:
    repo = tmp_path / "models"
    _write(repo, MODEL, tiny_gguf)
    with run_server(repo, llama_server=llama_server) as srv, srv.client(timeout=60) as c:
        pid = _child(srv, MODEL).pid
        assert pid is not None and _alive(pid)
        assert c.post(f"/v2/repository/models/{MODEL}/unload").status_code == 200
        wait_until(lambda: not _alive(pid), timeout=20)
        assert _index(srv)[MODEL]["state"] == "UNLOADED"


def test_killed_child_is_restarted(gguf_server: RunningServer) -> None:
    child = _child(gguf_server, CRASH)
    old = child.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: child.state == "restarting", timeout=10)
    with gguf_server.client() as c:  # the first restart waits a second: meanwhile, 503 with the reason
        r = c.post("/v1/chat/completions", json={"model": CRASH, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "restarting" in r.text, r.text
    wait_until(lambda: child.state == "ready" and child.pid not in (None, old), timeout=60)
    assert "exited with status -9" in child.last_crash
    r = _client(gguf_server).chat.completions.create(model=CRASH, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_child_that_stays_down_turns_the_model_failed(gguf_server: RunningServer) -> None:
    child = _child(gguf_server, FRAGILE)
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _index(gguf_server)[FRAGILE]["state"] == "FAILED", timeout=30)
    entry = _index(gguf_server)[FRAGILE]
    assert "exited with status -9" in entry["reason"] and entry["code"] == 2010
    with gguf_server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": FRAGILE, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "exited with status -9" in r.text
    assert child.state == "stopped" and child.pid is None


def test_missing_binary_fails_the_load_with_1001(tmp_path: Path, tiny_gguf: Path) -> None:
    repo = tmp_path / "models"
    _write(repo, MODEL, tiny_gguf)
    with run_server(repo, llama_server=tmp_path / "no-such-llama-server") as srv:
        entry = _index(srv)[MODEL]
        assert entry["state"] == "FAILED"
        assert entry["code"] == 1001
        assert "llama_server" in entry["reason"] and "INHOUSE_LLAMA_SERVER" in entry["reason"]
        assert "build_llama_server.sh" in entry["reason"]


def test_truncated_gguf_fails_with_reason_and_no_child(tmp_path: Path, tiny_gguf: Path, llama_server: Path) -> None:
    repo = tmp_path / "models"
    vdir = _write(repo, MODEL, tiny_gguf)
    data = (vdir / "model.gguf").read_bytes()
    (vdir / "model.gguf").write_bytes(data[: len(data) // 2])
    with run_server(repo, llama_server=llama_server) as srv:
        entry = _index(srv)[MODEL]
        assert entry["state"] == "FAILED" and entry["code"] == 1001
        assert "llama-server could not load model.gguf" in entry["reason"]
        assert not [cmd for cmd in _llama_children() if str(vdir) in cmd]


def test_checksum_mismatch_fails_before_start(tmp_path: Path, tiny_gguf: Path, llama_server: Path) -> None:
    repo = tmp_path / "models"
    _write(repo, MODEL, tiny_gguf, files={"sha256": {"1/model.gguf": "0" * 64}})
    with run_server(repo, llama_server=llama_server) as srv:
        entry = _index(srv)[MODEL]
        assert entry["state"] == "FAILED" and entry["code"] == 1004
        assert "Checksum mismatch" in entry["reason"]
        assert not [cmd for cmd in _llama_children() if str(repo) in cmd]


def test_api_key_required_when_auth_on(tmp_path: Path, tiny_gguf: Path, llama_server: Path) -> None:
    from inhouse.security.keys import KeyStore

    repo = tmp_path / "models"
    _write(repo, MODEL, tiny_gguf)
    data = tmp_path / "data"
    store = KeyStore(data)
    key = store.create("app", ["infer"])[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, llama_server=llama_server) as srv:
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong-key").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        r = _client(srv, key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=2, temperature=0)
        assert r.usage is not None and r.usage.completion_tokens >= 1


def test_json_schema_and_forced_tool_call(gguf_server: RunningServer) -> None:
    import jsonschema

    client = _client(gguf_server)
    # bounded values, so that a random model's output always completes within max_tokens
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "which city?"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"location": {"enum": ["Paris", "Tokyo"]}}, "required": ["location"],
        "additionalProperties": False}}}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather in Paris"}], tools=[tool], max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["location"] in ("Paris", "Tokyo")


def test_anthropic_ollama_and_v2_generate_routes(gguf_server: RunningServer) -> None:
    with gguf_server.client(timeout=120) as c:
        r = c.post("/v1/messages", json={"model": MODEL, "max_tokens": 6, "temperature": 0,
                                         "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["type"] == "message" and body["usage"]["output_tokens"] >= 1
        r = c.post("/api/chat", json={"model": MODEL, "stream": False, "options": {"num_predict": 6},
                                      "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200, r.text
        assert r.json()["done"] is True and r.json()["eval_count"] >= 1
        r = c.post(f"/v2/models/{MODEL}/generate", json={"text_input": "the weather",
                                                        "parameters": {"max_tokens": 6, "temperature": 0}})
        assert r.status_code == 200, r.text
        assert r.json()["finish_reason"] in ("length", "stop") and 0 < r.json()["completion_tokens"] <= 6


def _child_count(srv: RunningServer, name: str, messages: list[dict[str, Any]]) -> int:
    """The prompt's token count as the child itself has it: its template, then its tokenizer as
    /completion applies it to text (special tokens added)."""
    child = _child(srv, name)
    with httpx.Client(transport=child.transport(), base_url="http://llama", headers=child.headers,
                      timeout=60) as raw:
        prompt = raw.post("/apply-template", json={"messages": messages, "add_generation_prompt": True}
                          ).json()["prompt"]
        return len(raw.post("/tokenize", json={"content": prompt, "add_special": True, "parse_special": True}
                            ).json()["tokens"])


def test_prompt_tokens_in_usage_are_the_childs_count(gguf_server: RunningServer) -> None:
    turn = [{"role": "user", "content": "the weather in Paris"}]
    messages = [{"role": "system", "content": "answer briefly"}, *turn]
    expected = _child_count(gguf_server, MODEL, messages)
    r = _client(gguf_server).chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens == expected
    with gguf_server.client(timeout=120) as c:
        counted = c.post("/v1/messages/count_tokens", json={"model": MODEL, "system": "answer briefly",
                                                             "messages": turn})
        assert counted.status_code == 200, counted.text
        assert counted.json()["input_tokens"] == expected
        events = []
        with c.stream("POST", "/v1/messages", json={"model": MODEL, "max_tokens": 3, "stream": True,
                                                     "system": "answer briefly", "messages": turn}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        start = next(e for e in events if e["type"] == "message_start")
        assert start["message"]["usage"]["input_tokens"] == expected


def _overflow(srv: RunningServer, messages: list[dict[str, Any]], max_tokens: int, stream: bool) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    with srv.client(timeout=120) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text[:500]
    assert r.headers["inhouse-error-code"] == "2030"
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] == "2030" and error["type"] == "invalid_request_error" and error["param"] == "messages"
    return error


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_2030_in_the_words_agents_parse(gguf_server: RunningServer, stream: bool) -> None:
    """The child counts the prompt: past this model's window (2048) but within the child's own
    (8192), inhouse refuses it on the child's count; past the child's, the child refuses it and
    inhouse answers the same way. Either way before any byte of a stream, as OpenAI does."""
    for words in (1200, 6000):
        messages = [{"role": "user", "content": "hello world " * words}]
        n = _child_count(gguf_server, MODEL, messages)
        assert n > 2048 and (n < 8192) == (words == 1200)
        error = _overflow(gguf_server, messages, 16, stream)
        assert error["message"] == (
            f"This model's maximum context length is 2048 tokens. However, you requested {n + 16} tokens "
            f"({n} in the messages, 16 in the completion). Please reduce the length of the messages or completion.")
    short = [{"role": "user", "content": "hello"}]
    n = _child_count(gguf_server, MODEL, short)
    error = _overflow(gguf_server, short, 2048, stream)
    assert f"However, you requested {n + 2048} tokens ({n} in the messages, 2048 in the completion)" in error["message"]
    # the refused requests left the child's slots free
    r = _client(gguf_server).chat.completions.create(model=MODEL, messages=short, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_without_max_tokens_the_answer_ends_with_the_window(gguf_server: RunningServer) -> None:
    def chat(words: int) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "hello world " * words}]

    lo, hi = 100, 1500  # a prompt a few tokens short of the window (2048), found by bisection on the child's count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _child_count(gguf_server, MODEL, chat(mid)) < 2044 else (lo, mid)
    messages = chat(lo)
    n = _child_count(gguf_server, MODEL, messages)
    assert 2036 <= n < 2044
    r = _client(gguf_server).chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                     extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.prompt_tokens == n and r.usage.completion_tokens == 2048 - n


def test_cached_prefix_tokens_are_reported(gguf_server: RunningServer) -> None:
    """The child reuses the KV cache of a prompt that starts like an earlier one; its count of
    reused tokens reaches usage (``prompt_tokens_details.cached_tokens``)."""
    system = {"role": "system", "content": "you answer questions about cities and weather " * 30}
    client = _client(gguf_server)
    first = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Paris"}],
                                           max_tokens=2, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Tokyo"}],
                                            max_tokens=2, temperature=0)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert first.usage.prompt_tokens // 2 < details.cached_tokens < second.usage.prompt_tokens


CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "what is the weather in Paris today?"}],
    [{"role": "system", "content": "You answer in one line.\nNever more."},
     {"role": "user", "content": "first"}, {"role": "assistant", "content": "  reply with spaces  "},
     {"role": "user", "content": "second\r\nwith CRLF"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "third: {\"json\": [1, 2]} <tag/> {# not a comment #}"}],
    [{"role": "user", "content": "Grüße, 東京, 🙂 — and a tab\there"}],
]


def test_plain_chats_are_rendered_in_process_exactly_as_llama_server_does(gguf_server: RunningServer) -> None:
    """The GGUF's template passed the probes at load, so plain chats skip the child's
    /apply-template; on conversations beyond the probes the text is still the child's own."""
    engine = gguf_server.server.manager.resolve(MODEL).model.engine  # type: ignore[union-attr]
    assert engine.local_template is not None
    for messages in CONVERSATIONS:
        here = engine._render_here(messages, None, True, {})
        assert here is not None
        assert here == engine._server_render(messages, None, True, {})
    # other shapes are the child's to render: tools, tool calls and results, names, template arguments,
    # a last assistant turn
    tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    called = [{"role": "user", "content": "call f"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    assert engine._render_here(CONVERSATIONS[0], tool, True, {}) is None
    assert engine._render_here(called, None, True, {}) is None
    assert engine._render_here([{"role": "user", "content": "x", "name": "ann"}], None, True, {}) is None
    assert engine._render_here(CONVERSATIONS[0], None, True, {"enable_thinking": False}) is None
    prefill = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]  # continued by the child
    assert engine._render_here(prefill, None, True, {}) is None
    r = _client(gguf_server).chat.completions.create(model=MODEL, messages=CONVERSATIONS[1], max_tokens=4,
                                                     temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens == len(engine.tokenizer.encode(
        engine._server_render(CONVERSATIONS[1], None, True, {})))


NO_SYSTEM_TEMPLATE = (  # Gemma's rule: no system turns; llama-server folds one into the first user turn
    "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{%- endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{%- endfor %}{%- if add_generation_prompt %}<start_of_turn>model\n{%- endif %}")


def test_a_template_llama_server_renders_its_own_way_stays_with_llama_server(
        tmp_path: Path, tiny_gguf: Path, llama_server: Path) -> None:
    """Jinja2 refuses the system probe that llama-server's polyfill renders: every chat of this
    model goes to the child, and a chat with a system prompt is answered as the child renders it."""
    repo = tmp_path / "models"
    _write(repo, MODEL, tiny_gguf, chat_template=NO_SYSTEM_TEMPLATE)
    with run_server(repo, llama_server=llama_server) as srv:
        engine = srv.server.manager.resolve(MODEL).model.engine  # type: ignore[union-attr]
        assert engine.local_template is None
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        assert engine._render_here(messages, None, True, {}) is None
        rendered = engine._server_render(messages, None, True, {})
        assert "be brief" in rendered and "<start_of_turn>user" in rendered
        r = _client(srv).chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage is not None and r.usage.prompt_tokens == len(engine.tokenizer.encode(rendered))
