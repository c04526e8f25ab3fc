#!/usr/bin/env bash
# The interop suite's llama.cpp part: build llama-cpp-python (scripts/setup_llama_cpp.sh) and run
# the GGUF tests against it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_llama_cpp.sh
# Each perplexity test runs llama.cpp and transformers on the real model: minutes each on 2 cores.
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest --timeout 2400 -m "interop and llama_cpp" tests/interop "$@"
