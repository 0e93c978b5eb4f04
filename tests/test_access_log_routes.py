"""Every matched route logs its route template in the JSON access log (the label of the HTTP
metrics too): v2, OpenAI, Anthropic, Ollama, health; an unknown path stays "unmatched"."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest

from conftest import RunningServer, run_server
from inhouse.logs import JsonFormatter
from llm_api_fixtures import CHAT

HELLO = [{"role": "user", "content": "Hello"}]
ADD = {"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                  {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, str]]:
    lines = [orjson.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "inhouse.access"]
    return [(doc["method"], doc["path"], doc["route"]) for doc in lines]


def test_access_log_names_the_route_template(llm_api_server: RunningServer,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    requests = [
        ("POST", "/v1/chat/completions", {"model": CHAT, "messages": HELLO, "max_tokens": 2}, "/v1/chat/completions"),
        ("POST", "/v1/chat/completions", {"model": CHAT, "messages": HELLO, "max_tokens": 2, "stream": True},
         "/v1/chat/completions"),
        ("POST", "/v1/messages", {"model": CHAT, "messages": HELLO, "max_tokens": 2}, "/v1/messages"),
        ("POST", "/api/chat", {"model": CHAT, "messages": HELLO, "stream": False, "options": {"num_predict": 2}},
         "/api/chat"),
        ("GET", "/v1/models", None, "/v1/models"),
        ("GET", "/v2/health/ready", None, "/v2/health/ready"),
        ("GET", "/v2/health/live", None, "/v2/health/live"),
        ("GET", "/v2/models/add", None, "/v2/models/{model}"),
        ("GET", "/v2/models/add/versions/1/ready", None, "/v2/models/{model}/versions/{version}/ready"),
        ("POST", "/v2/models/add/infer", ADD, "/v2/models/{model}/infer"),
        ("GET", "/v2/models/add/infer", None, "/v2/models/{model}/infer"),  # 405: the path matched
        ("GET", "/metrics", None, "/metrics"),
        ("GET", "/no/such/route", None, "unmatched"),
        ("GET", "/v2/models/add/nothing-here", None, "unmatched"),
    ]
    with llm_api_server.client() as c:
        for method, path, body, _ in requests:
            r = c.request(method, path, json=body)
            assert r.status_code < 500, (path, r.text)
    assert _logged(caplog) == [(m, p, route) for m, p, _, route in requests]


def test_refused_requests_log_their_route_too(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inhouse.access")
    with run_server(repo, auth=True, load="add", open_readiness=False) as srv, srv.client() as c:
        assert c.get("/v2/health/ready").status_code == 401
        assert c.post("/v2/models/add/infer", json=ADD).status_code == 401
        assert c.post("/v1/chat/completions", json={"model": "add", "messages": HELLO}).status_code == 401
        assert c.get("/no/such/route").status_code == 401
    assert _logged(caplog) == [
        ("GET", "/v2/health/ready", "/v2/health/ready"),
        ("POST", "/v2/models/add/infer", "/v2/models/{model}/infer"),
        ("POST", "/v1/chat/completions", "/v1/chat/completions"),
        ("GET", "/no/such/route", "unmatched"),
    ]
