"""Peak resident memory of quantizing each built-in model, streamed (one block in memory, the CLI's
path, which names, folders and hub ids take) vs whole (a model loaded whole and quantized in memory
with llmquant.quantize(model object) + save), each in its own subprocess. The command behind
eval/RELIABILITY.md:

    python eval/reliability_memory.py --json eval/results/reliability-memory.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import json, resource, sys, time
import llmquant, llmquant.quantization.streaming
from llmquant import Calibration, QuantConfig
from llmquant.models import load_fp_model
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model, method, mode, out = sys.argv[1:5]
config = QuantConfig(method=method, bits=4, group_size=128)
calib = Calibration("wiki", 4, 256) if method != "rtn" else None
start = time.time()
if mode == "streamed":
    llmquant.quantization.streaming.quantize_to_disk(model, config, calib, out, progress=False)
else:
    whole, tokenizer = load_fp_model(model)
    llmquant.quantize(whole, config, calib, tokenizer=tokenizer, progress=False).save(out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "seconds": time.time() - start}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for method in args.methods:
            for mode in ("streamed", "whole"):
                with tempfile.TemporaryDirectory() as tmp:
                    done = subprocess.run([sys.executable, "-c", PROBE, model, method, mode, str(Path(tmp) / "out")],
                                          capture_output=True, text=True, check=True)
                row = {"model": model, "method": method, "mode": mode,
                       **json.loads(done.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(row, flush=True)
    print("\n| model | method | mode | peak RSS MiB | after imports MiB | growth MiB | seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['mode']} | {r['peak_mib']:.0f} | {r['baseline_mib']:.0f} | "
              f"{r['peak_mib'] - r['baseline_mib']:.0f} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
