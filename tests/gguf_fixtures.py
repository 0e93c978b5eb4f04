"""The llama.cpp build that ``scripts/build_llama_server.sh`` keeps (``llama-server``,
``llama-quantize``, ``convert_hf_to_gguf.py``), found as inhouse finds it. Under CI=true a missing
build fails the test instead of skipping it (.ci/run builds it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def need_llama_server() -> Path:
    from inhouse.backends.llamacpp import find_llama_server
    from inhouse.errors import ModelFormatError

    try:
        return find_llama_server(os.environ.get("INHOUSE_LLAMA_SERVER"))
    except ModelFormatError as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but llama-server is missing ({err.message}); .ci/run builds it.")
        pytest.skip("llama-server is not built; run: bash scripts/build_llama_server.sh")


def need_convert_tools() -> Path:
    """The llama-server binary, after checking its converter and llama-quantize are there too."""
    from inhouse.errors import InhouseError
    from inhouse.tools.convert_gguf import find_tools

    binary = need_llama_server()
    try:
        find_tools(str(binary))
    except InhouseError as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the GGUF converter is missing ({err.message}); .ci/run builds it.")
        pytest.skip("llama.cpp's converter is not built; run: bash scripts/build_llama_server.sh")
    return binary
