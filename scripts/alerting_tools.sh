#!/usr/bin/env bash
# Installs Prometheus and Alertmanager (with promtool and amtool) from Debian's packages, for
# tests/test_alerting.py, which runs them against the shipped configs. Does nothing when the
# binaries are already there; needs root (or sudo) otherwise.
# Usage: bash scripts/alerting_tools.sh
set -euo pipefail
if command -v prometheus >/dev/null && command -v amtool >/dev/null && command -v promtool >/dev/null \
   && { command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; }; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "alerting_tools.sh: run as root to apt-get install prometheus prometheus-alertmanager" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
