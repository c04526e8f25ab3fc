#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the fast test suite (under 20 minutes on 2 cores; real models
# appear in it through single blocks and a few windows). The slow real-model end-to-end tests are
# scripts/test_slow.sh. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest -m "not slow and not compile_proof" "$@"
