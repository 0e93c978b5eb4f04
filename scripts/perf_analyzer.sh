#!/usr/bin/env bash
# Puts a working Triton perf_analyzer into the active virtual environment's bin/, for the tests
# that run it against inhouse. PyPI's perf-analyzer wheels carry the binary only for glibc >= 2.38;
# on an older glibc (Debian 12) it runs on Debian 13's loader and C/C++ runtime, unpacked beside it.
# Everything comes from the package registries and is kept by version in the user's cache folder,
# so a second run on the same machine fetches nothing.
# Usage: bash scripts/perf_analyzer.sh        (inside the venv)
set -euo pipefail
VERSION=2.60.0
: "${VIRTUAL_ENV:?activate the virtual environment first}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/inhouse/perf_analyzer-$VERSION"
target="$VIRTUAL_ENV/bin/perf_analyzer"

runs() { "$1" --version >/dev/null 2>&1; }

shipped="$(python - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("perf_analyzer")
print(pathlib.Path(spec.origin).parent / "bin" / "perf_analyzer" if spec and spec.origin else "")
PY
)"
if [ -n "$shipped" ] && [ -x "$shipped" ] && runs "$shipped"; then
  exit 0  # the wheel's own binary runs here (glibc >= 2.38)
fi
if [ -x "$target" ] && runs "$target"; then
  exit 0
fi

binary="$cache/wheel/perf_analyzer/bin/perf_analyzer"
if [ ! -x "$binary" ]; then
  rm -rf "$cache/wheel" && mkdir -p "$cache/wheel"
  python -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
    --python-version 3.11 "perf-analyzer==$VERSION" -d "$cache/dl"
  python -m zipfile -e "$cache"/dl/perf_analyzer-"$VERSION"-*.whl "$cache/wheel"
  chmod +x "$binary"
fi

if runs "$binary"; then
  ln -sf "$binary" "$target"
  exit 0
fi

# An older glibc: Debian 13's libc6, libstdc++6 and libgcc-s1, fetched with apt into a private
# state folder (the machine's own apt sources and packages are not touched).
libs="$cache/trixie/usr/lib/x86_64-linux-gnu"
if [ ! -x "$libs/ld-linux-x86-64.so.2" ]; then
  apt_dir="$cache/apt"
  rm -rf "$apt_dir" "$cache/trixie" && mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$cache/debs"
  echo "deb http://deb.debian.org/debian trixie main" > "$apt_dir/sources.list"
  apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "APT::Get::List-Cleanup=0"
            -o "APT::Sandbox::User=root")
  apt-get "${apt_opts[@]}" -qq update
  (cd "$cache/debs" && apt-get "${apt_opts[@]}" -qq download libc6 libstdc++6 libgcc-s1)
  for deb in "$cache"/debs/*.deb; do dpkg-deb -x "$deb" "$cache/trixie"; done
fi
cat > "$target" <<SH
#!/bin/sh
# perf_analyzer $VERSION needs glibc 2.38: run it on Debian 13's loader and runtime (scripts/perf_analyzer.sh)
exec "$libs/ld-linux-x86-64.so.2" --library-path "$libs:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "$binary" "\$@"
SH
chmod +x "$target"
runs "$target" || { echo "perf_analyzer does not run here, even on Debian 13's runtime" >&2; exit 1; }
