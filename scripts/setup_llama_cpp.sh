#!/usr/bin/env bash
# Build llama-cpp-python 0.3.36 from its source distribution (llama.cpp compiled by CMake for this
# CPU) into llmquant's venv, for the GGUF part of the interop suite. About 10-20 minutes on 2 cores
# the first time; pip keeps the built wheel in its cache, so a later run on the same machine takes
# seconds. A venv that already has it is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${LLMQUANT_VENV:-.venv}/bin/python"
if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '0.3.36')" 2>/dev/null; then
  echo "llama-cpp-python 0.3.36 already installed"
  exit 0
fi
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
  "$PY" -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt \
  --no-binary llama-cpp-python llama-cpp-python==0.3.36
"$PY" -c "import llama_cpp; print(f'llama-cpp-python {llama_cpp.__version__}')"
