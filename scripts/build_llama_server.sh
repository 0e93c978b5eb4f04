#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-quantize from the sources vendored in the
# llama-cpp-python sdist (a pinned version from PyPI, so no other download source is needed), and
# keeps convert_hf_to_gguf.py with its own gguf-py beside them. The result is kept by version in
# the user's cache folder, so a second run builds nothing. Prints the llama-server path.
# Usage: bash scripts/build_llama_server.sh       (needs python with pip, cmake and a C++ compiler)
set -euo pipefail
VERSION=0.3.36  # llama-cpp-python, which pins the llama.cpp sources it vendors
cache="${XDG_CACHE_HOME:-$HOME/.cache}/inhouse/llama.cpp-$VERSION"
binary="$cache/bin/llama-server"
python="${PYTHON:-python3}"

if [ -x "$binary" ] && [ -x "$cache/bin/llama-quantize" ] && [ -d "$cache/convert/conversion" ]; then
  echo "$binary"
  exit 0
fi

for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "build_llama_server.sh needs $tool (apt-get install cmake g++)" >&2; exit 1; }
done

work="$cache/work"
rm -rf "$work" && mkdir -p "$work/dl" "$work/src"
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$work/dl" >&2
tar -xzf "$work"/dl/llama_cpp_python-"$VERSION".tar.gz -C "$work/src"
src="$work/src/llama_cpp_python-$VERSION/vendor/llama.cpp"

# Native CPU code: the cache belongs to this machine (CI builds on its own machine too).
# No web UI, TLS, curl, tests or examples: inhouse talks to the server on loopback only.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$work/build" --target llama-server llama-quantize -j "${BUILD_JOBS:-2}" >&2

rm -rf "$cache/bin" "$cache/convert" && mkdir -p "$cache/bin" "$cache/convert"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-quantize" "$cache/bin/"
# The converter needs the gguf-py of the same sources (PyPI's gguf can lag behind it).
cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$cache/convert/"
rm -rf "$work"
echo "$binary"
