#!/usr/bin/env bash
# Install the ecosystem's own loaders for the interop suite (tests/interop) into llmquant's venv
# (scripts/setup.sh first; LLMQUANT_VENV as there). All from wheels or pure-Python sources: a minute or two.
# - compressed-tensors: transformers' path for compressed-tensors folders (the stand-in for vLLM here);
# - optimum + gptqmodel: transformers' GPTQ and AWQ path (gptqmodel's torch kernels run on the CPU);
# - llm-compressor: writes the W8A8 / W4A16 checkpoints llmquant must read;
# - bitsandbytes: already a test dependency (NF4 / FP4 on the CPU).
# gptqmodel 7.7.0 asks for torch >= 2.14.1 and llm-compressor 0.14.0.1 for transformers <= 5.17 and
# compressed-tensors 0.19, pins this project cannot take: both install with --no-deps, and the runtime
# dependencies they import are listed here, under scripts/constraints.txt (torch, transformers held).
# llama-cpp-python (a CMake build) is separate: scripts/setup_llama_cpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${LLMQUANT_VENV:-.venv}/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -c scripts/constraints.txt \
  compressed-tensors==0.20.1 optimum==2.3.0 bitsandbytes==0.50.2 \
  threadpoolctl==3.8.0 device-smi==0.5.7 pypcre==0.6.4 tokenicer==0.0.14 logbar==0.4.15 defuser==0.0.28 \
  dill==0.4.1 loguru==0.7.3
"${PIP[@]}" --no-deps gptqmodel==7.7.0 llmcompressor==0.14.0.1
"$PY" - <<'PY' 2>/dev/null
from importlib.metadata import version
names = ("gptqmodel", "compressed-tensors", "llmcompressor", "optimum", "bitsandbytes", "torch", "transformers")
print("interop loaders:", ", ".join(f"{name} {version(name)}" for name in names))
PY
