#!/usr/bin/env bash
# The one command to run on a lent GPU (device tool): kernel correctness against the torch reference
# at every benchmark shape (fp16, and bf16 at the first shape), then the benchmark with per-shape
# tuning, written where the device tool brings files back ($OUT) and echoed.
# Usage (from the repository root on the GPU machine): bash kernels/gpu_check.sh
set -euo pipefail
OUT="${OUT:-eval/runs}"
mkdir -p "$OUT"
# Nothing can be installed there (no registry): import straight from the working tree.
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
python3 kernels/bench.py --device cuda --json "$OUT/kernels-gpu.json" --md "$OUT/kernels-gpu.md" 2>&1 | tee "$OUT/kernels-gpu.log"
