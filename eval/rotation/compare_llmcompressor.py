"""llmquant's rotated GPTQ against llm-compressor's SpinQuantModifier (R1, R2) + GPTQModifier, side by side.

SmolLM2-135M (the built-in offline model), the same calibration windows for both quantizers (llmquant's
own: 32 windows x 512 tokens of the wiki train split, seed 0, built once here and handed to each as
token ids), the same scheme, and each checkpoint saved, loaded back by llmquant and scored by llmquant's
perplexity on the same wiki test windows (40 x 512). Needs the interop venv (llm-compressor 0.14.0.1,
compressed-tensors 0.20.1):

    LLMQUANT_VENV=/tmp/venv-interop bash scripts/setup_interop.sh
    export OMP_NUM_THREADS=1 PYTHONPATH=.:kernels
    /tmp/venv-interop/bin/python eval/rotation/compare_llmcompressor.py --scheme w4pc --rows fp ours-rot llmc-spin \
        --json eval/rotation/llmcompressor-w4pc.json
    /tmp/venv-interop/bin/python eval/rotation/compare_llmcompressor.py --scheme w4pc --rows llmc ours \
        --json eval/rotation/llmcompressor-w4pc-baselines.json

(the commands behind eval/RESULTS.md, "Rotations before rounding", which lists the w4g128 / w4g64 ones;
two at a time on a 2-core machine). Without --rows a command runs every row in turn.

Schemes, as the rows of eval/RESULTS.md's rotation section: w4pc = 4-bit asymmetric per output channel,
GPTQ with act-order and the clipping search (llm-compressor: actorder "static", observer
"memoryless_mse" over the same 80 shrink factors 1.00..0.21 with the same |error|^2.4, early stop
off); w4g<N> = 4-bit asymmetric groups of N, plain GPTQ (no act-order, min-max ranges). llm-compressor
refuses groups that do not divide a layer's columns (SmolLM2's 576 and 128: ValueError, recorded in the
JSON as the row's error); groups of 64 divide every width. lm_head stays
in full precision on both sides. Rotations: llmquant's `--rotate hadamard` (seed 0) against
SpinQuantModifier(rotations=["R1", "R2"]) with --spin-type (default random-hadamard: SmolLM2's hidden
size 576 is no power of two, and compressed-tensors builds its deterministic "hadamard" only for
powers of two; --spin-block 64 gives the deterministic one as a block-diagonal 64 x 64 instead).

Rows (--rows, default all): fp, ours, ours-rot, llmc, llmc-spin, and llmc-spin-fp (llm-compressor's rotations
alone, not quantized, evaluated in memory: the rotated model's own perplexity). Each quantizer row records wall and
process-CPU seconds of the quantization alone (ours: reading the model, rotating, calibrating,
rounding, writing the checkpoint; llm-compressor: loading the model and oneshot, without the compressed
save), then the checkpoint's perplexity.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

import llmquant
from llmquant import Calibration, QuantConfig
from llmquant.api import evaluate
from llmquant.arch import arch_for
from llmquant.models import builtin_model_path, load_fp_model
from llmquant.evaluation.perplexity import PerplexityResult
from llmquant.quantization.planning import calibration_windows_for

MODEL = "smollm2-135m"
SUBSET = 8
ROWS = ("fp", "ours", "ours-rot", "llmc", "llmc-spin", "llmc-spin-fp")
# llmquant's clip search (grid/affine.py): shrink factors 1 - i/100 for i < 80, error sum |e|^2.4.
MSE_OBSERVER_KWARGS = {"maxshrink": 0.8, "grid": 100.0, "norm": 2.4, "patience": 1000}


def parse_scheme(name: str) -> tuple[int, int]:
    match = re.fullmatch(r"w(\d)(?:g(\d+)|pc)", name)
    if not match:
        raise SystemExit(f"bad scheme {name!r}: use w<bits>g<group> or w<bits>pc")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else -1


def measure(model, tokenizer, windows: int) -> dict:
    result = evaluate(model, "wiki", "test", 512, windows, progress=False, tokenizer=tokenizer)
    fields = {k: result[k] for k in PerplexityResult.__dataclass_fields__}
    result["ppl_first_8"] = PerplexityResult(**fields).perplexity_of_first(SUBSET)
    return result


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.time(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = round(time.time() - self.wall, 1), round(time.process_time() - self.cpu, 1)


def ours(bits, group_size, rotate, calibration, tokenizer, folder, windows, first_token_weight=1.0) -> dict:
    per_channel = group_size == -1
    config = QuantConfig(bits=bits, group_size=group_size, sym=False, method="gptq", act_order=per_channel,
                         clip_search=per_channel, rotate="hadamard" if rotate else None, rotate_seed=0,
                         first_token_weight=first_token_weight)
    with Clock() as clock:
        checkpoint = llmquant.quantize(MODEL, config, calibration, out=folder, overwrite=True, progress=False)
    report = {k: v for k, v in checkpoint.report().items() if k != "layers"}
    result = measure(llmquant.load(folder), tokenizer, windows)
    return {**result, "quantize_wall_s": clock.wall, "quantize_cpu_s": clock.cpu, "evaluated": "checkpoint",
            "report": report}


def llmc_recipe(bits, group_size, spin: bool, spin_type: str, spin_block: int | None):
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform import SpinQuantModifier

    per_channel = group_size == -1
    weights = {"num_bits": bits, "type": "int", "symmetric": False,
               "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else group_size,
               "observer": "memoryless_mse" if per_channel else "memoryless_minmax",
               "observer_kwargs": MSE_OBSERVER_KWARGS if per_channel else {}}
    recipe = [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                           ignore=["lm_head"], actorder="static" if per_channel else None,
                           dampening_frac=0.01, block_size=128)]
    if spin:
        recipe.insert(0, SpinQuantModifier(rotations=["R1", "R2"], transform_type=spin_type,
                                           transform_block_size=spin_block))
    return recipe


def llmc(bits, group_size, spin, spin_type, spin_block, calibration, tokenizer, folder, windows) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot

    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    with Clock() as clock:
        model, _ = load_fp_model(MODEL)
        recipe = llmc_recipe(bits, group_size, spin, spin_type, spin_block)
        oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=calibration.shape[1],
                num_calibration_samples=calibration.shape[0], shuffle_calibration_samples=False)
    # save_pretrained compresses the model in place: a copy stays computable in case the folder cannot be read
    in_memory = copy.deepcopy(model)
    model.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    row = {"quantize_wall_s": clock.wall, "quantize_cpu_s": clock.cpu,
           "recipe": [repr(modifier) for modifier in recipe], "saved_quantization_config": config.get("quantization_config")}
    try:
        loaded = llmquant.load(folder)
    except Exception as exc:  # what llmquant cannot read is the finding; the row still gets a number
        row["load_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return {**measure(in_memory, tokenizer, windows), **row, "evaluated": "in-memory model (checkpoint unreadable)"}
    return {**measure(loaded, tokenizer, windows), **row, "evaluated": "checkpoint"}


def llmc_rotated_fp(spin_type, spin_block, calibration, tokenizer, windows) -> dict:
    """llm-compressor's SpinQuant alone, in memory: how far its rotated model is from the FP one before any
    rounding (it also centres the embeddings, which RMSNorm does not undo)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform import SpinQuantModifier

    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    model, _ = load_fp_model(MODEL)
    oneshot(model=model, dataset=dataset, max_seq_length=calibration.shape[1],
            num_calibration_samples=calibration.shape[0], shuffle_calibration_samples=False,
            recipe=[SpinQuantModifier(rotations=["R1", "R2"], transform_type=spin_type, transform_block_size=spin_block)])
    return {**measure(model, tokenizer, windows), "evaluated": "in-memory model (no quantization)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", default="w4pc")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--spin-type", default="random-hadamard", choices=["hadamard", "random-hadamard", "random-matrix"])
    parser.add_argument("--spin-block", type=int, default=None, help="SpinQuant transform_block_size (default: whole size)")
    parser.add_argument("--first-token-weight", type=float, default=1.0,
                        help="llmquant's rows: GPTQ's --first-token-weight (default 1, GPTQ as published)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    bits, group_size = parse_scheme(args.scheme)

    folder = builtin_model_path(MODEL)
    fp_model, tokenizer = load_fp_model(MODEL)
    calibration, _ = calibration_windows_for(Calibration("wiki", args.nsamples, args.calib_seqlen), tokenizer,
                                             arch_for(fp_model.config), fp_model.config.vocab_size)
    meta = {"scheme": args.scheme, "first_token_weight": args.first_token_weight, "model": str(folder), "calibration": {
        "corpus": "wiki", "split": "train", "nsamples": args.nsamples, "seqlen": args.calib_seqlen, "seed": 0,
        "windows_sha256": hashlib.sha256(calibration.numpy().tobytes()).hexdigest()},
        "spin_type": args.spin_type, "spin_block": args.spin_block,
        "versions": {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
        "threads": torch.get_num_threads()}
    results = []

    def done(label, row):
        results.append({"config": label, **row})
        print(f"| {label} | {row.get('perplexity', float('nan')):.3f} | {row.get('ppl_first_8', float('nan')):.3f} | "
              f"{row.get('quantize_wall_s', '–')} | {row.get('quantize_cpu_s', '–')} | "
              f"{row.get('evaluated', row.get('error', ''))} |", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=str) + "\n")

    if "fp" in args.rows:
        done("fp32", measure(fp_model, tokenizer, args.windows))
    del fp_model
    spin = f"SpinQuant R1+R2 {args.spin_type}" + (f" block {args.spin_block}" if args.spin_block else "")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows:
            out = Path(tmp) / name
            if name in ("ours", "ours-rot"):
                row = ours(bits, group_size, name == "ours-rot", calibration, tokenizer, out, args.windows,
                           args.first_token_weight)
                label = "llmquant GPTQ" + (" + --rotate hadamard" if name == "ours-rot" else "") + \
                    (f" + --first-token-weight {args.first_token_weight:g}" if args.first_token_weight != 1 else "")
            elif name in ("llmc", "llmc-spin"):
                try:
                    row = llmc(bits, group_size, name == "llmc-spin", args.spin_type, args.spin_block, calibration,
                               tokenizer, out, args.windows)
                except Exception as exc:  # an llm-compressor failure is recorded, the other rows still run
                    traceback.print_exc()
                    done(f"{args.scheme} asym {name}", {"error": f"{type(exc).__name__}: {exc}"})
                    continue
                label = "llm-compressor GPTQModifier" + (f" + {spin}" if name == "llmc-spin" else "")
            elif name == "llmc-spin-fp":
                row = llmc_rotated_fp(args.spin_type, args.spin_block, calibration, tokenizer, args.windows)
                label = f"FP32 + llm-compressor {spin}, not quantized"
            else:
                continue
            done(f"{args.scheme} asym {label}", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
