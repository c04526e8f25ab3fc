#!/usr/bin/env bash
# Install llama-cpp-python 0.3.36 into llmquant's venv (default .venv; LLMQUANT_VENV overrides), for
# the GGUF part of the interop suite and as the outside reference of eval/bench_cpu.py. Not part of
# setup.sh: nothing else needs it. LLAMA_CPP_WHEEL=path/to.whl installs a wheel built before;
# otherwise pip builds PyPI's sdist with CMake for this CPU (GGML_NATIVE): about 10-20 minutes on
# 2 cores the first time, seconds later (pip caches the built wheel). An installed 0.3.36 is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${LLMQUANT_VENV:-.venv}/bin/python"
VERSION=0.3.36
if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"
  exit 0
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt)
# its runtime dependencies (none of them pulls torch)
"${PIP[@]}" "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
if [ -n "${LLAMA_CPP_WHEEL:-}" ]; then
  "${PIP[@]}" --no-deps "$LLAMA_CPP_WHEEL"
else
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    "${PIP[@]}" --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
fi
