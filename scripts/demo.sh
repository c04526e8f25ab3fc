#!/usr/bin/env bash
# The main job: set up, quantize the default model (SmolLM2-135M) to 4 bits with RTN, evaluate FP
# and quantized perplexity on the wiki test split, and generate a sample from the checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
LQ="${LLMQUANT_VENV:-.venv}/bin/llmquant"
OUT="${OUT:-out/smollm2-135m-rtn-w4g128}"
WINDOWS="${WINDOWS:-40}"
"$LQ" quantize smollm2-135m --method rtn --bits 4 --group-size 128 --asym --out "$OUT" --overwrite
"$LQ" eval smollm2-135m --corpus wiki --split test --seqlen 512 --max-windows "$WINDOWS" --json "$OUT.fp.ppl.json"
"$LQ" eval "$OUT" --corpus wiki --split test --seqlen 512 --max-windows "$WINDOWS" --json "$OUT.ppl.json"
"$LQ" generate "$OUT" --chat --prompt "Explain in two sentences why the sky is blue." --max-new-tokens 60
echo
"${LLMQUANT_VENV:-.venv}/bin/python" scripts/demo_summary.py "$OUT.fp.ppl.json" "$OUT.ppl.json" "$OUT"
