"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): valid and
schema-violating requests, with and without a key, through the security layer to every route.
No request may produce a 5xx. The budget is bounded (INHOUSE_FUZZ_EXAMPLES per operation and
mode, default 6) so it fits in CI."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from conftest import run_server
from inhouse.security.keys import KeyStore

EXAMPLES = int(os.environ.get("INHOUSE_FUZZ_EXAMPLES", "6"))


def test_no_5xx_from_schema_fuzzing(repo: Path) -> None:
    data = repo.parent / "data"
    store = KeyStore(data)
    key = store.create("fuzz", ["infer", "admin", "metrics"])[0]
    store.close()
    with run_server(repo, auth=True, data_dir=data, load="add,echo-str") as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers={"x-api-key": key})
        session = requests.Session()
        failures: list[str] = []
        def fuzz(strategy: object, who: str) -> None:
            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            def run(case: schemathesis.Case) -> None:
                for headers in ({"x-api-key": key}, {}) if who == "positive" else ({"x-api-key": key},):
                    resp = case.call(base_url=srv.url, session=session, headers=headers, timeout=30)
                    if resp.status_code >= 500:
                        failures.append(f"{case.method} {case.formatted_path} ({who}) -> {resp.status_code}: "
                                        f"{resp.text[:200]}")
                    if not headers:  # without a key only liveness answers
                        assert resp.status_code in (401, 200), (case.path, resp.status_code)

            # Unsatisfiable: nothing to violate (e.g. a GET without parameters in negative mode)
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                run()

        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(op.as_strategy(generation_mode=mode), mode.value)
        assert not failures, "\n".join(failures[:20])


# the schema's own pages, and the console's HTML and files: not an API to fuzz
NOT_IN_SCHEMA = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/console", "/console/static/{name}"}


def test_every_route_is_in_the_schema(server: Any) -> None:
    """A route missing from /openapi.json is never fuzzed: every mounted API route is listed
    (KServe v2, OpenAI, Anthropic, Ollama, Responses, v2 generate, admin, console API)."""
    from test_route_guards import _routes

    paths = requests.get(server.url + "/openapi.json", timeout=30).json()["paths"]
    listed = {(method.upper(), path) for path, ops in paths.items() for method in ops}
    mounted = {(method, re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path))
               for route in _routes(server.server.app.routes)
               for method in (route.methods or {"GET"}) - {"HEAD"}}
    missing = sorted(m for m in mounted if m[1] not in NOT_IN_SCHEMA and m not in listed)
    assert len(mounted) > 50 and missing == []
