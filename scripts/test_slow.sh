#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the slow real-model suite: whole-model quantize / save / load /
# perplexity / generate on SmolLM2-135M and Gemma-3-270M (about half an hour on 2 cores), and the
# full GPU compile proof (every Triton kernel x launch candidate x dtype x target compiled ahead of
# time and compared with kernels/llmquant_kernels/compiled.json: 35 minutes on 2 busy cores, less
# with more). CI runs it after scripts/test.sh. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest -m slow "$@"
