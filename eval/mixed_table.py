"""Uniform vs sensitivity-driven mixed precision (GPTQ, asymmetric) at a bits-per-weight budget:
perplexity of the saved checkpoints loaded back, and their size. The commands behind eval/RESULTS.md's
mixed-precision section are written there, e.g. for SmolLM2:

    llmquant sensitivity smollm2-135m --method gptq --bits 3 4 8 --group-sizes 64 128 \\
        --out eval/results/smollm2-sensitivity-gptq.json
    python eval/mixed_table.py --model smollm2-135m --sensitivity eval/results/smollm2-sensitivity-gptq.json \\
        --uniform w3g64 w4g128 --targets 3.5 4.25 --windows 16 --nsamples 8 --json eval/results/smollm2-mixed.json

Each mixed run's target is the uniform run's own bits per weight (same budget), plus --targets.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from dataclasses import replace
from pathlib import Path

from llmquant import Calibration, QuantConfig
from llmquant.quantization.allocation import allocate
from llmquant.api import evaluate
from llmquant.quantization.sensitivity import SensitivityTable
from llmquant.quantization.streaming import quantize_to_disk


def run(model, config, calib, windows, tmp):
    out, report = quantize_to_disk(model, config, calib, Path(tmp) / "ckpt", overwrite=True, progress=False, plots=False)
    ppl = evaluate(str(out), max_windows=windows, progress=False)["perplexity"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    return {"bits_per_weight": report["bits_per_weight"], "perplexity": ppl, "checkpoint_mb": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sensitivity", required=True)
    parser.add_argument("--uniform", nargs="*", default=["w3g64", "w4g128"])
    parser.add_argument("--targets", nargs="*", type=float, default=[3.5, 4.25])
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    table = SensitivityTable.load(args.sensitivity)
    calib = Calibration("wiki", args.nsamples, 512)
    base = QuantConfig(method="gptq", bits=4, group_size=128, sym=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = []
        for name in args.uniform:
            bits, group = (int(v) for v in re.fullmatch(r"w(\d)g(-?\d+)", name).groups())
            row = {"allocation": f"uniform {name}", **run(args.model, replace(base, bits=bits, group_size=group), calib,
                                                          args.windows, tmp)}
            rows.append(row)
            print(row, flush=True)
            targets.append(row["bits_per_weight"])
        for target in targets + list(args.targets):
            allocation = allocate(table, target)
            overrides = {n: {"bits": b, "group_size": g} for n, (b, g) in allocation.choices.items()}
            row = {"allocation": f"mixed @ {target:.3f}", "predicted_delta_loss": allocation.predicted_delta_loss,
                   **run(args.model, replace(base, layer_overrides=overrides), calib, args.windows, tmp)}
            rows.append(row)
            print(row, flush=True)
    print(f"\n{args.model}, GPTQ asym, {args.windows} windows x 512 of the wiki test split\n")
    print("| allocation | bits/weight (linears) | perplexity | checkpoint MB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['allocation']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['checkpoint_mb']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
