"""The fault suite (``python -m bench.faults --quick``) against real servers: every row meets its target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about two minutes on a busy 2-core machine; the disk-full case needs root (tmpfs)
def test_quick_fault_suite_meets_every_target(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-m", "bench.faults", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    rows = json.loads(out.read_text())
    assert rows, proc.stdout + proc.stderr
    assert [r for r in rows if not r["ok"]] == [], proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
