"""The CI rule of ``ci_required``: run in a separate pytest on test files whose torch /
transformers import fails (made to fail with ``sys.modules[name] = None``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_FILES = {
    "test_module_skip.py": (
        "import sys\nimport pytest\nsys.modules['torch'] = None\npytest.importorskip('torch')\n\n"
        "def test_never_collected():\n    pass\n"),
    "test_fixture_skip.py": (
        "import sys\nimport pytest\n\n@pytest.fixture\ndef hf():\n    sys.modules['transformers'] = None\n"
        "    pytest.importorskip('transformers')\n\ndef test_needs_transformers(hf):\n    pass\n\n"
        "def test_optional_extra():\n    pytest.importorskip('no_such_optional_extra')\n"),
}


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    for name, text in _FILES.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    # past the collection error, so one run shows every outcome
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "ci_required", "-p",
                           "no:cacheprovider", "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_import_failures_skip(tmp_path: Path, ci: str | None) -> None:
    done = _run(tmp_path, ci)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 skipped" in done.stdout and "could not import 'torch'" in done.stdout, done.stdout


def test_under_ci_torch_and_transformers_import_failures_fail(tmp_path: Path) -> None:
    done = _run(tmp_path, "true")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "1 skipped, 2 errors" in out, out  # a collection error (the file) and a setup error (the fixture)
    assert "could not import 'torch'" in out and "could not import 'transformers'" in out, out
    assert "must not skip" in out and "SKIPPED" in out and "no_such_optional_extra" in out, out
