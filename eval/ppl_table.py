"""FP vs quantized perplexity for a list of configs, as a markdown table.

Each config is quantized, saved, loaded back from disk and evaluated, so the numbers are those
of the real checkpoint. Example (the command behind eval/RESULTS.md):

    python eval/ppl_table.py --model smollm2-135m --methods rtn --configs w4g32 w4g64 w4g128 w4pc w3g64 \
        --windows 40 --json eval/results/smollm2-rtn.json

Config names: w<bits>g<group size> or w<bits>pc (per output channel); symmetric and asymmetric
grids are both run unless --sym or --asym is given. Methods: rtn, gptq, gptq-ao (GPTQ with
act-order), -clip variants (clip_search), -sink variants of the GPTQ ones (--first-token-weight 10), -rot variants of every method (Hadamard rotations fused
in first, --rotate hadamard) and -rot-r4 (with --rotate-online down_proj as well), awq, awq-duo (duo scaling), awq+gptq, awq+gptq-ao;
w8a8-dynamic / w8a8-static (naive int8 weights and activations), sq<alpha>-dynamic and
sq<alpha>-static-<observer> (SmoothQuant, alpha 0.5 / 0.8 / auto; observer minmax, percentile,
mse, kl; config name w8pc --sym); nf4, nf4-dq, fp4, fp4-dq (bitsandbytes 4-bit, -dq with double
quantization; config name w4g<blocksize> --sym, format bitsandbytes); fp8 (W8A8-FP8: e4m3 weights per channel,
dynamic per-token e4m3 activations; config name w8pc --sym) and fp8-block (FP8 weight-only, square blocks;
config name w8g<block> --sym), both written as compressed-tensors float-quantized; methods that calibrate use --nsamples windows of
--calib-seqlen tokens of the wiki train split. Checkpoints are written in --format (default
gptq, or the method's own: compressed-tensors for W8A8, bitsandbytes for NF4 / FP4).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import llmquant
from llmquant.algorithms import algorithm_for
from llmquant import Calibration, QuantConfig
from llmquant.api import evaluate, load_with_tokenizer
from llmquant.evaluation.perplexity import PerplexityResult

SUBSET = 8  # REFERENCE.md section 8 compares on the first 8 windows
# Table name -> QuantConfig fields.
METHODS = {
    "rtn": {"method": "rtn"},
    "rtn-clip": {"method": "rtn", "clip_search": True},
    "gptq": {"method": "gptq"},
    "gptq-ao": {"method": "gptq", "act_order": True},
    "gptq-ao-clip": {"method": "gptq", "act_order": True, "clip_search": True},
    "awq": {"method": "awq"},
    "awq-duo": {"method": "awq", "awq_duo_scaling": True},
    "awq+gptq": {"method": "awq+gptq"},
    "awq+gptq-ao": {"method": "awq+gptq", "act_order": True},
    "w8a8-dynamic": {"method": "w8a8"},
    "w8a8-static": {"method": "w8a8", "act_quant": "static"},
    **{f"sq{alpha}-dynamic": {"method": "smoothquant", "alpha": alpha} for alpha in (0.5, 0.8, "auto")},
    **{f"sq{alpha}-static-{observer}": {"method": "smoothquant", "alpha": alpha, "act_quant": "static",
                                         "observer": observer}
       for alpha in (0.5, 0.8, "auto") for observer in ("minmax", "percentile", "mse", "kl")},
    "nf4": {"method": "nf4"},
    "nf4-dq": {"method": "nf4", "double_quant": True},
    "fp4": {"method": "fp4"},
    "fp4-dq": {"method": "fp4", "double_quant": True},
    "fp8": {"method": "fp8"},
    "fp8-block": {"method": "fp8-block"},
}
# Each GPTQ-rounding method with each calibration window's first token (the attention sink) counted SINK_WEIGHT
# times in the Hessian (--first-token-weight): "<method>-sink".
SINK_WEIGHT = 10.0
METHODS.update({f"{name}-sink": {**fields, "first_token_weight": SINK_WEIGHT} for name, fields in list(METHODS.items())
                if fields["method"] in ("gptq", "awq+gptq")})
# Each method with randomized Hadamard rotations fused in first (llmquant/rotation/fused.py): "<method>-rot", and with
# down_proj's input rotated online as well (R4, llmquant/rotation/online.py): "<method>-rot-r4".
BASE_METHODS = list(METHODS.items())
METHODS.update({f"{name}-rot": {**fields, "rotate": "hadamard"} for name, fields in BASE_METHODS})
METHODS.update({f"{name}-rot-r4": {**fields, "rotate": "hadamard", "rotate_online": ("down_proj",)}
                for name, fields in BASE_METHODS})


def parse_config(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"w(\d)(?:g(\d+)|pc)", name)
    if not match:
        raise SystemExit(f"bad config name {name!r}: use w<bits>g<group> or w<bits>pc")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else -1


def row(label, result, extra=("–", "–", "–", "–")):
    return (f"| {label} | {result['perplexity']:.3f} | {result['ppl_first_8']:.3f} | "
            + " | ".join(str(e) for e in extra) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["rtn"], choices=sorted(METHODS))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=["w4g32", "w4g64", "w4g128", "w4pc", "w3g64"])
    grids = parser.add_mutually_exclusive_group()
    grids.add_argument("--sym", dest="grids", action="store_const", const=[True])
    grids.add_argument("--asym", dest="grids", action="store_const", const=[False])
    parser.add_argument("--corpus", default="wiki")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--format", default=None, help="default: gptq, or the method's own (compressed-tensors for "
                                                      "W8A8, compressed-tensors-fp8 for FP8, bitsandbytes for NF4 / FP4)")
    parser.add_argument("--rotate-seed", type=int, default=0, help="seed of the -rot variants' random signs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--layer-errors", action="store_true",
                        help="also keep each quantized layer's relative output and weight error in --json "
                             "(eval/RESULTS.md compares them with and without rotation); data-free methods then "
                             "run the calibration windows too, to measure output errors (their rounding is the same)")
    args = parser.parse_args(argv)
    grids = args.grids or [True, False]

    def measure(model, tokenizer):
        result = evaluate(model, args.corpus, "test", args.seqlen, args.windows, progress=False, tokenizer=tokenizer)
        fields = {k: result[k] for k in PerplexityResult.__dataclass_fields__}
        result["ppl_first_8"] = PerplexityResult(**fields).perplexity_of_first(SUBSET)
        return result

    results = []
    fp_model, tokenizer = load_with_tokenizer(args.model)
    fp = measure(fp_model, tokenizer)
    del fp_model
    results.append({"config": "fp32", **fp})
    lines = [
        f"| config | PPL {fp['windows']}×{args.seqlen} | PPL first {SUBSET} | bits/weight | "
        "packed MiB | fp16 MiB | quantize s |",
        "|---|---|---|---|---|---|---|",
        row("FP32", fp),
    ]
    print(lines[-1], file=sys.stderr, flush=True)
    calibration = Calibration("wiki", args.nsamples, args.calib_seqlen)
    for name, sym, method in itertools.product(args.configs, grids, args.methods):
        bits, group_size = parse_config(name)
        config = QuantConfig(bits=bits, group_size=group_size, sym=sym, format=args.format,
                             rotate_seed=args.rotate_seed, **METHODS[method])
        start = time.time()
        calib = calibration if algorithm_for(config).needs_calibration or args.layer_errors else None
        qmodel = llmquant.quantize(args.model, config, calib, progress=False)
        seconds = time.time() - start
        report = qmodel.report()
        with tempfile.TemporaryDirectory() as tmp:
            qmodel.save(Path(tmp) / "ckpt")
            del qmodel
            result = measure(llmquant.load(Path(tmp) / "ckpt"), tokenizer)
        label = f"{name} {'sym' if sym else 'asym'} {method}"
        kept = {k: v for k, v in report.items() if k != "layers"}
        if args.layer_errors:
            kept["layer_errors"] = {layer["name"]: [layer["relative_output_error"], layer["relative_weight_error"]]
                                    for layer in report["layers"]}
        results.append({"config": label, **result, "report": kept})
        lines.append(row(label, result, (
            f"{report['bits_per_weight']:.3f}", f"{report['quantized_layers_packed_bytes'] / 2**20:.1f}",
            f"{report['quantized_layers_fp16_bytes'] / 2**20:.1f}", f"{seconds:.1f}")))
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
