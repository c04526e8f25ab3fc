#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the slow real-model suite: whole-model quantize / save / load /
# perplexity / generate / task accuracy on SmolLM2-135M and Gemma-3-270M (about 40 minutes on 2
# cores). CI runs it after scripts/test.sh. The full GPU compile proof is its own command
# (scripts/test_compile_proof.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest -m "slow and not compile_proof" "$@"
