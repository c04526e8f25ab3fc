#!/usr/bin/env bash
# Set up (scripts/setup.sh) and recompile every Triton kernel x launch candidate x dtype x target ahead of
# time, comparing each with kernels/llmquant_kernels/compiled.json (35 minutes on 2 busy cores; the fast
# suite recompiles a sample of 42). CI runs it when its measured bound still fits. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest -m compile_proof "$@"
