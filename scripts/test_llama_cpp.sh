#!/usr/bin/env bash
# The interop suite's llama.cpp part: build llama-cpp-python (scripts/setup_llama_cpp.sh) and run
# the GGUF tests against it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_llama_cpp.sh
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest -m "interop and llama_cpp" tests/interop "$@"
