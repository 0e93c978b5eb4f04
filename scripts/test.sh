#!/usr/bin/env bash
# Install inhouse with its test dependencies and run the default test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[test]'
# Triton's perf_analyzer for the tests that run it (needed under CI; optional elsewhere)
bash scripts/perf_analyzer.sh || [ "${CI:-}" != "true" ] || exit 1
ruff check .
mypy src/inhouse
python -m pytest -q -m "not slow" "$@"
