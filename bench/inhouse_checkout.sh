#!/bin/bash
# `inhouse` run from this checkout's src/ (for harnesses that take an executable, such as the peer
# benchmark's INHOUSE=...): PYTHON is the interpreter of a venv with inhouse's dependencies.
#   INHOUSE=$PWD/bench/inhouse_checkout.sh PYTHON=.venv/bin/python ./peers.sh run
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m inhouse "$@"
