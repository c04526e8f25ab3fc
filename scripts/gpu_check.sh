#!/usr/bin/env bash
# The one prepared command for a GPU machine (see scripts/gpu_check.py): kernel correctness and speed
# against torch fp16 matmul, GPTQ time per block with its projection, decode speed, on random-init
# models of real shapes; writes GPU.md and gpu-check.json to $OUT (else eval/runs), within ~8 minutes.
# Run from the repository root: bash scripts/gpu_check.sh
set -euo pipefail
OUT="${OUT:-eval/runs}"
mkdir -p "$OUT"
# Nothing can be installed on that machine: import straight from the working tree.
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET LLMQUANT_KERNELS
timeout 480 python3 scripts/gpu_check.py --out "$OUT" --budget 420 "$@" 2>&1 | tee "$OUT/gpu-check.log"
