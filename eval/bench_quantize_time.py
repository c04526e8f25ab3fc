"""Quantization time of the W8A8 methods (static W8A8, SmoothQuant) against GPTQ with the same
calibration, as `llmquant quantize` runs them (one block at a time from the model folder), plus the
perplexity of each checkpoint on the first windows of the wiki test split.

GPTQ runs first (and, with --baseline-runs 2, last too); each method's time is given as a ratio to
GPTQ's (the mean of its runs), in wall seconds and in CPU seconds (the process's own, which other
work on a shared machine disturbs less).
The commands behind eval/QUANTIZE_TIME.md (the W8A8 table; the rotation table with
--methods "gptq w4g128 rotated"):

    OMP_NUM_THREADS=2 python eval/bench_quantize_time.py --model smollm2-135m --nsamples 8 --seqlen 512 \\
        --windows 4 --baseline-runs 1 --md eval/QUANTIZE_TIME.md --json eval/results/quantize-time.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmquant import Calibration, QuantConfig
from llmquant.api import evaluate
from llmquant.quantization.streaming import quantize_to_disk

METHODS = {
    "gptq w4g128": {"method": "gptq", "bits": 4, "group_size": 128},
    "w8a8 static minmax": {"method": "w8a8", "act_quant": "static"},
    "w8a8 static kl": {"method": "w8a8", "act_quant": "static", "observer": "kl"},
    "smoothquant 0.5 dynamic": {"method": "smoothquant", "alpha": 0.5},
    "smoothquant auto dynamic": {"method": "smoothquant", "alpha": "auto"},
    "smoothquant 0.5 static mse": {"method": "smoothquant", "alpha": 0.5, "act_quant": "static", "observer": "mse"},
    # the same GPTQ with Hadamard rotations fused in first (issue 35: at most 1.2x the time without)
    "gptq w4g128 rotated": {"method": "gptq", "bits": 4, "group_size": 128, "rotate": "hadamard"},
}
BASELINE = "gptq w4g128"


def device() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "CPU")
    return f"{cpu}, {torch.get_num_threads()} torch threads, {platform.machine()}"


def run(model: str, name: str, calib: Calibration, windows: int, folder: Path) -> dict:
    config = QuantConfig(**METHODS[name])
    out = folder / name.replace(" ", "-")
    wall, cpu = time.time(), time.process_time()
    _, report = quantize_to_disk(model, config, calib, out, progress=False, plots=False)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    result = evaluate(str(out), "wiki", "test", 512, windows, progress=False)
    print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU, perplexity {result['perplexity']:.4f}", file=sys.stderr,
          flush=True)
    return {"method": name, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "perplexity": result["perplexity"],
            "windows": result["windows"], "checkpoint_sha256": report["checkpoint_sha256"],
            "scaling": report["scaling"][:3]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4, help="wiki test windows of 512 tokens for the perplexity")
    parser.add_argument("--methods", nargs="+",
                        default=[m for m in METHODS if m != BASELINE and "rotate" not in METHODS[m]],
                        choices=[m for m in METHODS if m != BASELINE])
    parser.add_argument("--baseline-runs", type=int, default=2, choices=[1, 2],
                        help="GPTQ first, or first and last (default)")
    parser.add_argument("--md", default=None, help="append the table here")
    parser.add_argument("--json", default=None)
    parser.add_argument("--label", default="", help="a note for the table's heading (e.g. the code version)")
    args = parser.parse_args(argv)

    calib = Calibration("wiki", args.nsamples, args.seqlen)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = run(args.model, BASELINE, calib, args.windows, Path(tmp) / "first")
        rows = [run(args.model, name, calib, args.windows, Path(tmp)) for name in args.methods]
        baseline = [first] + ([run(args.model, BASELINE, calib, args.windows, Path(tmp) / "last")]
                              if args.baseline_runs == 2 else [])
    base_wall = sum(r["wall_s"] for r in baseline) / len(baseline)
    base_cpu = sum(r["cpu_s"] for r in baseline) / len(baseline)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python eval/bench_quantize_time.py " + shlex.join(
        argv or sys.argv[1:])
    lines = [f"### Quantize time against GPTQ{' — ' + args.label if args.label else ''}", "",
             f"{args.model}, calibration wiki train {args.nsamples} x {args.seqlen} tokens for every method; "
             f"perplexity on the first {first['windows']} windows of 512 tokens of the wiki test split. "
             f"Device: {device()}.", "", "```", command, "```", "",
             "| method | wall s | CPU s | wall / GPTQ | CPU / GPTQ | perplexity |", "|---|---|---|---|---|---|"]
    labelled = [(BASELINE, first), *((r["method"], r) for r in rows)]
    if len(baseline) == 2:
        labelled = [(f"{BASELINE} (first)", first), *labelled[1:], (f"{BASELINE} (last)", baseline[1])]
    for label, row in labelled:
        lines.append(f"| {label} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['wall_s'] / base_wall:.2f} | "
                     f"{row['cpu_s'] / base_cpu:.2f} | {row['perplexity']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.md:
        path = Path(args.md)
        previous = path.read_text() if path.exists() else ""
        path.write_text(previous + ("\n" if previous else "") + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"gptq": baseline, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
