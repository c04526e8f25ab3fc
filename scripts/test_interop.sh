#!/usr/bin/env bash
# The interop suite's quick part: set up the outside loaders that install from wheels
# (scripts/setup_interop.sh) and run every interop test except llama.cpp's (scripts/test_llama_cpp.sh).
# LLMQUANT_INTEROP_REPORT=FILE appends each comparison's figures to FILE (eval/interop_table.py reads them).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_interop.sh
# Each test quantizes the real model and runs it through two loaders: minutes each on 2 shared cores,
# past the suite-wide 900 s timeout when the machine is busy.
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest --timeout 2400 -m "interop and not llama_cpp" tests/interop "$@"
