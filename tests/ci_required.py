"""Under ``CI=true`` a test, or a whole test file, skipped because torch, transformers or ray will
not import fails the run instead: CI installs them (the ``test`` extra), so there such a skip means
a broken install, not an optional extra. Elsewhere the skip stays a skip."""

from __future__ import annotations

import os
from typing import Any

import pytest

REQUIRED = ("torch", "transformers", "ray")


def _failed_import(longrepr: Any) -> str | None:
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text if any(f"could not import '{name}'" in text for name in REQUIRED) else None


def _fail_in_ci(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or os.environ.get("CI", "").lower() != "true":
        return
    text = _failed_import(report.longrepr)
    if text is not None:
        report.outcome = "failed"
        report.longrepr = (f"{text} (CI=true: the test extra installs torch, transformers and ray, so this must "
                           "not skip)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    outcome = yield
    _fail_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    _fail_in_ci(outcome.get_result())
