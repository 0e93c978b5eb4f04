#!/usr/bin/env bash
# TensorFlow SavedModel → ONNX tests. TensorFlow (tensorflow-cpu, ~270 MB, about two minutes to
# install and ten seconds to import) stays out of the default test install, so these tests are
# marked slow; this script installs the convert-tf extra into its own virtual environment
# (.venv-tf, or $INHOUSE_TF_VENV) and runs them.
# Usage: bash scripts/test-tf.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${INHOUSE_TF_VENV:-.venv-tf}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet -e '.[test,convert-tf]'
"$venv/bin/python" -m pytest -q -m slow tests/test_convert_tf.py "$@"
