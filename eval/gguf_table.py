"""Perplexity of exported GGUF files, loaded back through transformers (`gguf_file=`), as a markdown
table: type, importance matrix or not, perplexity, file size, bits per weight (all tensors).
The command behind eval/RESULTS.md's GGUF section:

    python eval/gguf_table.py --model smollm2-135m --windows 40 --json eval/results/smollm2-gguf.json
    python eval/gguf_table.py --model gemma3-270m --windows 8 --json eval/results/gemma3-gguf.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmquant import Calibration
from llmquant.api import evaluate
from llmquant.gguf_export import export_gguf
from llmquant.models import load_fp_model

RUNS = [("f16", False), ("q8_0", False), ("q4_0", False), ("q4_0", True), ("q4_1", False), ("q4_1", True),
        ("q4_k", False), ("q4_k", True)]


def bits_per_weight(path: Path) -> float:
    reader = gguf.GGUFReader(str(path))
    return 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--imatrix-samples", type=int, default=32, help="wiki train windows of 512 for the imatrix")
    parser.add_argument("--json")
    args = parser.parse_args()

    model, tokenizer = load_fp_model(args.model)
    rows = [{"type": "FP (reference)", "imatrix": False,
             "perplexity": evaluate(model, max_windows=args.windows, progress=False, tokenizer=tokenizer)["perplexity"]}]
    del model
    print(rows[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, imatrix in RUNS:
            start = time.time()
            calib = Calibration("wiki", args.imatrix_samples, 512) if imatrix else None
            path = export_gguf(args.model, Path(tmp) / f"model-{kind}.gguf", kind, calib=calib)
            exported = time.time() - start
            loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
            their_tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
            ppl = evaluate(loaded, max_windows=args.windows, progress=False, tokenizer=their_tokenizer)["perplexity"]
            rows.append({"type": kind, "imatrix": imatrix, "perplexity": ppl, "file_mb": path.stat().st_size / 1e6,
                         "bits_per_weight": bits_per_weight(path), "export_s": exported})
            print(rows[-1], flush=True)
            path.unlink()
    print(f"\n{args.model}, {args.windows} windows x 512 of the wiki test split\n")
    print("| type | imatrix | perplexity | file MB | bits/weight |\n|---|---|---|---|---|")
    for row in rows:
        size = f"{row['file_mb']:.1f} | {row['bits_per_weight']:.3f}" if "file_mb" in row else "– | 16/32"
        print(f"| {row['type']} | {'yes' if row['imatrix'] else 'no'} | {row['perplexity']:.3f} | {size} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "windows": args.windows, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
