#!/usr/bin/env bash
# Fetches Debian's redis-server (with the libraries it needs that the system may lack) with
# `apt-get download` and unpacks it into a private folder, for the response-cache tests; no root,
# nothing installed system-wide. Prints the path of a redis-server that runs from there. Does
# nothing but print when it is already unpacked (or when redis-server is on PATH).
# Usage: bash scripts/redis_server.sh
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  command -v redis-server
  exit 0
fi
root="${XDG_CACHE_HOME:-$HOME/.cache}/inhouse/redis"
wrapper="$root/bin/redis-server"
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
  echo "$wrapper"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# redis-tools holds the binary (redis-server is a link to it); liblzf1 and libjemalloc2 are its
# libraries that a slim image lacks
(cd "$work" && apt-get download redis-server redis-tools liblzf1 libjemalloc2 >/dev/null 2>&1) || {
  echo "redis_server.sh: apt-get download redis-server redis-tools liblzf1 libjemalloc2 failed" >&2; exit 1; }
rm -rf "$root/pkg"
mkdir -p "$root/pkg" "$root/bin"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$root/pkg"; done
lib="$(dirname "$(find "$root/pkg" -name 'liblzf.so.1*' | head -n 1)")"
cat >"$wrapper" <<WRAP
#!/bin/sh
LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$root/pkg/usr/bin/redis-server" "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version >/dev/null
echo "$wrapper"
