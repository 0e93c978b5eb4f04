#!/usr/bin/env bash
# Installs Debian's Chromium for the console's browser tests (tests/test_console.py drives it with
# playwright; no browser is downloaded). Does nothing when it is already there; needs root (or sudo).
# Usage: bash scripts/chromium.sh
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
