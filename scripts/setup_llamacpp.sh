#!/usr/bin/env bash
# Install llama-cpp-python 0.3.36 (the outside reference of eval/bench_cpu.py) into the llmquant venv
# (default .venv; override with LLMQUANT_VENV). Not part of setup.sh: nothing else needs it.
# LLAMA_CPP_WHEEL=path/to.whl installs a wheel built before; otherwise pip builds PyPI's sdist on
# this CPU (CMake, a few minutes on 2 cores), with the CPU's own instruction set (GGML_NATIVE).
# Idempotent: an importable llama_cpp is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMQUANT_VENV:-.venv}"
PY="$VENV/bin/python"
VERSION=0.3.36
if [ ! -x "$PY" ]; then
  echo "no virtual environment at $VENV: run scripts/setup.sh first" >&2
  exit 1
fi
if "$PY" -c "import llama_cpp" 2>/dev/null; then
  "$PY" -c "import llama_cpp; print(f'llama-cpp-python {llama_cpp.__version__} already installed')"
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
"$PY" -c "import llama_cpp; print(f'llama-cpp-python {llama_cpp.__version__}')"
