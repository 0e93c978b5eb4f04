#!/usr/bin/env bash
# Install inhouse with its test dependencies and run the default test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e '.[test]'
# Tools the tests run for real (needed under CI; optional elsewhere, where their tests skip):
# Triton's perf_analyzer, Prometheus and Alertmanager, Chromium, redis-server (Debian packages)
bash scripts/perf_analyzer.sh || [ "${CI:-}" != "true" ] || exit 1
bash scripts/alerting_tools.sh || [ "${CI:-}" != "true" ] || exit 1
bash scripts/chromium.sh || [ "${CI:-}" != "true" ] || exit 1
# redis-server for the response-cache tests, unpacked from Debian's package into ~/.cache/inhouse
if redis_server="$(bash scripts/redis_server.sh)"; then
  export INHOUSE_REDIS_SERVER="$redis_server"
elif [ "${CI:-}" = "true" ]; then
  exit 1
fi
# llama.cpp's llama-server and its GGUF converter, built from the pinned llama-cpp-python sdist
# once per machine (minutes) and kept in the cache folder
if llama_server="$(PYTHON=python bash scripts/build_llama_server.sh)"; then
  export INHOUSE_LLAMA_SERVER="$llama_server"
elif [ "${CI:-}" = "true" ]; then
  exit 1
fi
ruff check .
mypy src/inhouse
python -m pytest -q -m "not slow" "$@"
