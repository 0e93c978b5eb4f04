"""Images in chats: a tiny random SmolVLM converted to GGUF with its projector (``llamacpp.mmproj``),
served by a real ``llama-server`` child and called through the ``openai`` and ``anthropic`` SDKs.
The same model is also served with ``backend: vllm`` — the relay's chat path, with llama-server
and the projector standing in for ``vllm serve`` (the ``vllm_command`` setting), and the model
found to be a VLM from its config.json. On both engines two different images must give different
greedy outputs (the image reached the model), the Open-AutoGLM request shape streams, and bad
images get coded errors: a text-only model 400, an oversized image 413, data that is not an image
or a URL off the allow-list 400. A remote image under an allow-listed prefix (a real HTTP server
the test starts) is fetched; the built-in engine answers images with a 400 naming the engines
that read them."""

from __future__ import annotations

import base64
import http.server
import json
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import RunningServer, run_server
from gguf_fixtures import need_convert_tools
from llm_fixtures import write_llm_model
from vlm_fixtures import build_vlm, convert_vlm, png

openai = pytest.importorskip("openai")
VLM, TEXT = "tiny-vlm", "tiny-text-only"
VLLM_VLM, VLLM_TEXT = "tiny-vlm-vllm", "tiny-text-vllm"  # backend: vllm
BUILTIN = "tiny-builtin"  # backend: transformers
ENGINES = pytest.mark.parametrize(("vlm", "text"), [(VLM, TEXT), (VLLM_VLM, VLLM_TEXT)], ids=["llamacpp", "vllm"])
RED = png(64, 64, lambda x, y: (255, 0, 0))
CHECKS = png(64, 64, lambda x, y: (0, 0, 255) if (x // 8 + y // 8) % 2 else (255, 255, 255))


def _url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _write(repo: Path, name: str, files: dict[str, Path], llamacpp: dict[str, Any], **spec: Any) -> None:
    vdir = repo / name / "1"
    vdir.mkdir(parents=True)
    for target, src in files.items():
        shutil.copy(src, vdir / target)
    doc = {"name": name, "backend": "llamacpp", "task": "chat",
           "llamacpp": {"ctx_size": 2048, "parallel": 2, "threads": 1, **llamacpp}, **spec}
    (repo / name / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {"/ok/red.png": RED, "/ok/text.png": b"not a picture"}.get(self.path)
        if self.path == "/ok/moved.png":
            self.send_response(302)
            self.send_header("Location", "/ok/red.png")
            self.end_headers()
            return
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory: pytest.TempPathFactory, image_host: str,
               llm_models: dict[str, Path]) -> Iterator[RunningServer]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from inhouse.tools.convert_gguf import find_tools

    binary = need_convert_tools()
    root = tmp_path_factory.mktemp("vlm")
    hf = build_vlm(root / "hf")
    text, mmproj = convert_vlm(hf, root, find_tools(str(binary)).convert_dir)
    repo = root / "models"
    _write(repo, VLM, {"model.gguf": text, "mmproj.gguf": mmproj}, {"mmproj": "mmproj.gguf"},
           max_image_bytes=40_000)
    _write(repo, TEXT, {"model.gguf": text}, {})
    _write_vllm(repo, VLLM_VLM, hf, {}, max_image_bytes=40_000)
    _write_vllm(repo, VLLM_TEXT, hf, {"images": False})  # the config says VLM; model.yaml has the last word
    write_llm_model(repo, BUILTIN, llm_models["llama"], {"max_model_len": 512})
    stand_in = [str(binary), "--model", str(text), "--mmproj", str(mmproj), "--ctx-size", "2048", "--parallel", "2",
                "--threads", "1", "--no-webui", "--jinja"]
    with run_server(repo, llama_server=binary, vllm_command=stand_in, image_url_allow=[f"{image_host}/ok/"]) as srv:
        yield srv


def _write_vllm(repo: Path, name: str, source: Path, vllm: dict[str, Any], **spec: Any) -> None:
    (repo / name / "1").mkdir(parents=True)
    doc = {"name": name, "backend": "vllm", "task": "chat", "source": str(source),
           "vllm": {"max_model_len": 2048, **vllm}, **spec}
    (repo / name / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _client(srv: RunningServer) -> Any:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", timeout=120, max_retries=0)


def _describe(srv: RunningServer, image: bytes | str, model: str = VLM) -> str:
    url = image if isinstance(image, str) else _url(image)
    r = _client(srv).chat.completions.create(
        model=model, max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "describe the picture"},
                                               {"type": "image_url", "image_url": {"url": url}}]}])
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.prompt_tokens > 4
    return r.choices[0].message.content or ""


@ENGINES
def test_two_images_give_different_greedy_outputs(vlm_server: RunningServer, vlm: str, text: str) -> None:
    red, checks = _describe(vlm_server, RED, vlm), _describe(vlm_server, CHECKS, vlm)
    assert red != checks
    assert _describe(vlm_server, RED, vlm) == red  # greedy: the same image, the same answer


@ENGINES
def test_open_autoglm_request_shape_streams(vlm_server: RunningServer, vlm: str, text: str) -> None:
    """What Open-AutoGLM's phone agent sends each step: a system prompt, then the task text and
    a screenshot as a data URL, streamed, temperature 0, top_p 0.85, frequency_penalty 0.2."""
    pieces, finish = [], None
    for chunk in _client(vlm_server).chat.completions.create(
            model=vlm, stream=True, temperature=0, top_p=0.85, frequency_penalty=0.2, max_tokens=10,
            messages=[{"role": "system", "content": "You are a phone-operating agent."},
                      {"role": "user", "content": [{"type": "text", "text": "Open the settings app."},
                                                   {"type": "image_url", "image_url": {"url": _url(CHECKS)}}]}]):
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert finish in ("stop", "length") and "".join(pieces)


def test_allow_listed_remote_image_is_fetched(vlm_server: RunningServer, image_host: str) -> None:
    assert _describe(vlm_server, f"{image_host}/ok/red.png") == _describe(vlm_server, RED)


@ENGINES
def test_anthropic_image_block(vlm_server: RunningServer, vlm: str, text: str) -> None:
    with vlm_server.client(timeout=120) as c:
        r = c.post("/v1/messages", json={"model": vlm, "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": base64.b64encode(RED).decode()}},
                {"type": "text", "text": "describe the picture"}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["output_tokens"] >= 1


@ENGINES
def test_bad_images_get_coded_errors(vlm_server: RunningServer, image_host: str, vlm: str, text: str) -> None:
    rng = random.Random(0)
    noisy = png(160, 160, lambda x, y: (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    assert len(noisy) > 40_000

    def send(model: str, url: str) -> Any:
        with vlm_server.client(timeout=120) as c:
            return c.post("/v1/chat/completions", json={"model": model, "max_tokens": 4, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]})

    r = send(text, _url(RED))
    assert r.status_code == 400 and "accepts text only" in r.text, r.text
    assert "llamacpp.mmproj" in r.text and "backend: vllm" in r.text, r.text
    r = send(vlm, _url(noisy))
    assert r.status_code == 413 and "max_image_bytes" in r.text, r.text
    r = send(vlm, _url(b"these bytes are not a picture", "image/png"))
    assert r.status_code == 400 and "not an image" in r.text, r.text
    r = send(vlm, "https://example.com/cat.png")
    assert r.status_code == 400 and "image_url_allow" in r.text, r.text
    r = send(vlm, f"{image_host}/elsewhere/red.png")  # the right host, outside the allowed path
    assert r.status_code == 400 and "image_url_allow" in r.text, r.text
    r = send(vlm, f"{image_host}/ok/text.png")
    assert r.status_code == 400 and "not an image" in r.text, r.text
    r = send(vlm, f"{image_host}/ok/moved.png")  # redirects are not followed: they could leave the list
    assert r.status_code == 400 and "HTTP 302" in r.text, r.text
    assert _describe(vlm_server, RED, vlm)  # still serving


def test_builtin_engine_answers_images_with_the_engines_that_read_them(vlm_server: RunningServer) -> None:
    """The built-in engine reads text only: an image part, OpenAI's or Anthropic's, is a 400 that
    names the two engines that serve images, and the model keeps serving text."""
    client = _client(vlm_server)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BUILTIN, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe the picture"}, {"type": "image_url", "image_url": {"url": _url(RED)}}]}])
    message = str(err.value)
    assert "accepts text only" in message and "messages[0].content[1]" in message, message
    assert "backend: llamacpp with llamacpp.mmproj" in message and "backend: vllm" in message, message
    with vlm_server.client(timeout=120) as c:
        r = c.post("/v1/messages", json={"model": BUILTIN, "max_tokens": 4, "messages": [
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": base64.b64encode(RED).decode()}}]}]})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "backend: vllm" in r.text and "llamacpp.mmproj" in r.text, r.text
    r2 = client.chat.completions.create(model=BUILTIN, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert r2.usage is not None and r2.usage.completion_tokens >= 1


def test_json_schema_with_an_image_on_vllm(vlm_server: RunningServer) -> None:
    """The chat path carries the schema too: the answer parses and matches it."""
    import jsonschema

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue", "white"]}}, "required": ["color"],
              "additionalProperties": False}
    r = _client(vlm_server).chat.completions.create(
        model=VLLM_VLM, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        messages=[{"role": "user", "content": [{"type": "text", "text": "which color?"},
                                               {"type": "image_url", "image_url": {"url": _url(RED)}}]}])
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_ollama_images(vlm_server: RunningServer) -> None:
    """Open WebUI and the ollama client send base64 ``images`` beside the text: the same image
    gives the same greedy answer as through the OpenAI API, a different one a different answer."""
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=vlm_server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}

    def describe(image: bytes) -> str:
        r = client.chat(model=VLM, options=options, messages=[
            {"role": "user", "content": "describe the picture", "images": [base64.b64encode(image).decode()]}])
        return str(r.message.content)

    red = describe(RED)
    assert red != describe(CHECKS)
    assert red == describe(RED)
    generated = client.generate(model=VLM, prompt="describe the picture", options=options,
                                images=[base64.b64encode(RED).decode()])
    assert generated.response == red  # /api/generate renders the prompt as the same user turn
    for call, status, text in [
        (lambda: client.chat(model=TEXT, messages=[{"role": "user", "content": "x",
                                                    "images": [base64.b64encode(RED).decode()]}]), 400, "text only"),
        (lambda: client.chat(model=VLM, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), 400,
         "not an image"),
        (lambda: client.generate(model=VLM, prompt="x", raw=True, images=[base64.b64encode(RED).decode()]), 400,
         "raw"),
    ]:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == status and text in e.value.error, e.value.error
