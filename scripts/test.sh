#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, real-model tests included.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest -m "slow or not slow" "$@"
