"""The one prepared check for a GPU machine: kernel correctness and speed, GPTQ time and decode speed
on random-init models of real shapes, written to GPU.md (and gpu-check.json) in --out.

    bash scripts/gpu_check.sh                     # on the GPU machine (writes to $OUT, else eval/runs)
    python scripts/gpu_check.py --dry --out DIR   # on a CPU: tiny shapes, Triton interpreter

A GPU machine here has torch + CUDA, triton, transformers, accelerate, peft and safetensors but no
datasets, no offline model or corpus packages and no network, and little may be carried to it: so
every model is built from a config with random weights (Llama-3.2-1B and Llama-3-8B shapes),
calibration is random token ids, and everything is compared as ratios measured in the same run.

1. Kernels against dequantize-then-matmul (the torch reference op) on Llama-3-8B shapes
   (4096x4096, 4096x14336, 14336x4096), group 128: W4A16 GPTQ sym / asym / act-order, AWQ, W8A8, NF4,
   and FP8: W8A8-FP8 (torch._scaled_mm with row-wise scales against the e4m3 emulation) and FP8
   weight-only with 128 x 128 block scales (the Triton kernel against dequantize-then-matmul).
2. Kernel time against torch's fp16 matmul of the same shape at M = 1, 16, 64, 512, 4096; and at
   decode batch sizes M = 1..8, W4A16 (GPTQ and AWQ layouts, g128) through the GEMV against the tiled
   kernel and torch's fp16 matmul, with the two kernels checked against each other.
2b. The fast Hadamard transform of R4 (hadamard_rows) against the dense product x @ H by the same
   matrix (torch fp16 matmul), at the down_proj orders 1536 = 12 x 128, 8192 and 14336 = 224 x 64:
   difference and time.
3. GPTQ w4 g128 end to end (streamed, on the GPU) of 1B- and 8B-shaped models with a few blocks, at
   two calibration sizes of 2048-token windows: time per block, and the linear projection to 128
   windows and every block of the real model.
4. Greedy decode tok/s at batch 1 and 16 for fp16, W4A16 (GPTQ g128) and W8A8, eager and compiled
   (llmquant.inference.generation's compiled decode: static cache, torch.compile fullgraph, CUDA graphs), on the
   1B shape and on the 8B shape cut to a few blocks (every block costs the same; the ratios hold).
The dry mode runs the same code on tiny shapes with the Triton kernels under the interpreter, so that
a test keeps this script working.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "--dry" in sys.argv:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LLMQUANT_KERNELS"] = "triton"

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

import torch  # noqa: E402

import bench as kernel_bench  # noqa: E402  (kernels/bench.py: operands, op calls, timing)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=256)


class Plan:
    """The sizes of one run: real shapes on a GPU, tiny ones in the dry mode."""

    def __init__(self, dry: bool, kernels: list[str] | None = None):
        self.dry = dry
        self.kernels = kernels or KERNELS  # the kernels sections 1 and 2 run
        self.device = "cpu" if dry else "cuda"
        self.dtype = torch.float32 if dry else torch.float16  # the interpreter computes bf16 wrongly
        self.kernel_shapes = [(256, 128), (128, 256)] if dry else [(4096, 4096), (4096, 14336), (14336, 4096)]
        self.timed_shapes = self.kernel_shapes[:1] if dry else self.kernel_shapes
        self.batches = [1, 16] if dry else [1, 16, 64, 512, 4096]
        self.decode_rows = [1, 3, 8] if dry else list(range(1, 9))
        # first calls tune both kernels per M bucket (compiles included): two shapes keep it near a minute
        self.decode_path_shapes = self.kernel_shapes[:1] if dry else [(4096, 4096), (4096, 14336)]
        self.gptq_models = ({"1B-shaped (tiny)": (TINY, 2, TINY["num_hidden_layers"])} if dry else
                            {"Llama-3.2-1B-shaped": (LLAMA_1B, 3, LLAMA_1B["num_hidden_layers"]),
                             "Llama-3-8B-shaped": (LLAMA_8B, 3, LLAMA_8B["num_hidden_layers"])})
        self.calibration_sizes = (2, 4) if dry else (4, 8)
        self.group_size = 32 if dry else 128
        self.seqlen = 32 if dry else 2048
        # (shape, blocks built): the 8B shape with 4 of its 32 blocks keeps the files and the time small
        self.decode_models = ({"tiny": (TINY, TINY["num_hidden_layers"])} if dry else
                              {"Llama-3.2-1B-shaped": (LLAMA_1B, LLAMA_1B["num_hidden_layers"]),
                               "Llama-3-8B-shaped, 4 blocks": (LLAMA_8B, 4)})
        self.decode_batches = (1, 2) if dry else (1, 16)
        # the dry run checks the compiled path's plumbing (no graph break, static cache) without inductor's minutes
        self.compile_backend = "eager" if dry else "inductor"
        self.new_tokens = 3 if dry else 64
        self.fp_label = "fp32 (dry run)" if dry else "fp16"
        self.hadamard_orders = (64, 1536) if dry else (1536, 8192, 14336)
        self.hadamard_rows = (1, 3) if dry else (1, 16, 512, 4096)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gptq_operands(k: int, n: int, variant: str, device: str) -> dict:
    """GPTQ-layout tensors with random codes: sym (every stored zero 7, as v1 writes zero 8), asym
    (random zeros), or act-order (asym, g_idx of a random column permutation)."""
    operands = kernel_bench.random_operands("w4a16-gptq", k, n, device, torch.float16)
    if variant == "sym":
        operands["qzeros"] = torch.full_like(operands["qzeros"], 0x77777777)
    if variant == "act-order":
        order = torch.randperm(k, generator=torch.Generator().manual_seed(k))
        operands["g_idx"] = (torch.argsort(order) // kernel_bench.GROUP).int().to(device)
    return operands


KERNELS = ["w4a16-gptq-sym", "w4a16-gptq-asym", "w4a16-gptq-act-order", "w4a16-awq", "w8a8", "nf4-dq", "fp8",
           "fp8-block"]
TIMED_KERNELS = ["w4a16-gptq-sym", "w4a16-gptq-act-order", "w4a16-awq", "w8a8", "nf4-dq", "fp8", "fp8-block"]


def operands_of(kind: str, k: int, n: int, plan: Plan) -> tuple[str, dict]:
    """(kernel_bench kind, packed operands) of one of KERNELS."""
    if kind.startswith("w4a16-gptq"):
        return "w4a16-gptq", kernel_bench._scales_in(gptq_operands(k, n, kind.removeprefix("w4a16-gptq-"),
                                                                   plan.device), plan.dtype)
    return kind, kernel_bench.random_operands(kind, k, n, plan.device, plan.dtype)


def check_kernels(plan: Plan) -> list[dict]:
    rows = []
    for k, n in plan.kernel_shapes:
        for kind in plan.kernels:
            bench_kind, operands = operands_of(kind, k, n, plan)
            for m in (1, 5, 32) if kind.startswith("w4a16") else (1, 32):  # 1, 5: the GEMV
                x = torch.randn(m, k, device=plan.device, dtype=plan.dtype)
                error = kernel_bench.check(bench_kind, x, operands, k, n)
                rows.append({"kernel": kind, "K": k, "N": n, "M": m, "rel_error": error, "ok": error < 1e-2})
                print(f"check {kind:22s} K={k:5d} N={n:5d} M={m:3d}: rel. error {error:.1e}", flush=True)
    return rows


def time_kernels(plan: Plan) -> list[dict]:
    rows = []
    for k, n in plan.timed_shapes:
        weight = torch.randn(n, k, device=plan.device, dtype=plan.dtype)
        for kind in [k for k in TIMED_KERNELS if k in plan.kernels]:
            bench_kind, operands = operands_of(kind, k, n, plan)
            for m in plan.batches:
                x = torch.randn(m, k, device=plan.device, dtype=plan.dtype)
                seconds = kernel_bench.timed(kernel_bench.op_call(bench_kind, x, operands, k, n), plan.device, 3)
                baseline = kernel_bench.timed(lambda: x @ weight.t(), plan.device, 3)
                rows.append({"kernel": kind, "K": k, "N": n, "M": m, "us": seconds * 1e6, "fp16_us": baseline * 1e6,
                             "speedup": baseline / seconds})
                print(f"time {kind:22s} K={k:5d} N={n:5d} M={m:4d}: {seconds * 1e6:9.1f} us, fp16 {baseline * 1e6:9.1f} us, "
                      f"x{baseline / seconds:.2f}", flush=True)
    return rows


def time_hadamard(plan: Plan) -> list[dict]:
    """R4's online transform (the kernel, through the op) against x @ H, the dense matrix in x's dtype."""
    import math

    from llmquant.inference import ops
    from llmquant.rotation.hadamard import hadamard, hadamard_factors

    rows = []
    with ops.use_backend("triton"):
        for n in plan.hadamard_orders:
            small, _ = hadamard_factors(n)
            small = small.to(plan.device) if small is not None else None
            dense = (hadamard(n) / math.sqrt(n)).to(plan.device, plan.dtype)
            for m in plan.hadamard_rows:
                x = torch.randn(m, n, device=plan.device, dtype=plan.dtype)
                fast = ops.hadamard_transform(x, small, 1 / math.sqrt(n))
                exact = x.double() @ dense.double()
                error = ((fast.double() - exact).abs().max() / exact.abs().max()).item()
                us = kernel_bench.timed(lambda: ops.hadamard_transform(x, small, 1 / math.sqrt(n)), plan.device, 3) * 1e6
                dense_us = kernel_bench.timed(lambda: x @ dense, plan.device, 3) * 1e6
                rows.append({"n": n, "M": m, "us": us, "dense_us": dense_us, "speedup": dense_us / us,
                             "rel_error": error, "ok": error < 1e-2})
                print(f"hadamard n={n:5d} M={m:4d}: {us:9.1f} us, dense {dense_us:9.1f} us, x{dense_us / us:.2f}, "
                      f"rel. error {error:.1e}", flush=True)
    return rows


# The layouts timed at decode batch sizes: the GEMV of each against the tiled kernel
DECODE_PATH_LAYOUTS = {"gptq": ("w4a16-gptq-sym", {"layout": "gptq"}),
                       "awq": ("w4a16-awq", {"layout": "awq", "zero_offset": 0, "group_size": kernel_bench.GROUP})}


def time_decode_paths(plan: Plan) -> list[dict]:
    """W4A16 (GPTQ layout sym g128, AWQ layout g128) at M = 1..8 through both kernels (the GEMV the
    launcher picks there, and the tiled kernel it replaced) against torch's fp16 matmul of the same shape."""
    from llmquant_kernels import w4a16_matmul

    rows = []
    for k, n in plan.decode_path_shapes:
        weight = torch.randn(n, k, device=plan.device, dtype=plan.dtype)
        for layout, (kind, layout_args) in DECODE_PATH_LAYOUTS.items():
            _, t = operands_of(kind, k, n, plan)
            for m in plan.decode_rows:
                x = torch.randn(m, k, device=plan.device, dtype=plan.dtype)
                calls = {path: (lambda path=path: w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                                                               None, bits=4, **layout_args, path=path))
                         for path in ("gemv", "tiled")}
                gemv, tiled = calls["gemv"]().float(), calls["tiled"]().float()
                disagree = ((gemv - tiled).abs().max() / tiled.abs().max().clamp(min=1e-12)).item()
                us = {path: kernel_bench.timed(call, plan.device, 3) * 1e6 for path, call in calls.items()}
                fp16 = kernel_bench.timed(lambda: x @ weight.t(), plan.device, 3) * 1e6
                rows.append({"layout": layout, "K": k, "N": n, "M": m, "gemv_us": us["gemv"], "tiled_us": us["tiled"],
                             "fp16_us": fp16, "gemv_vs_fp16": fp16 / us["gemv"], "gemv_vs_tiled": us["tiled"] / us["gemv"],
                             "rel_difference": disagree, "ok": disagree < 1e-2})
                print(f"decode path {layout} K={k:5d} N={n:5d} M={m}: gemv {us['gemv']:8.1f} us, tiled "
                      f"{us['tiled']:8.1f} us, fp16 {fp16:8.1f} us, gemv x{fp16 / us['gemv']:.2f} of fp16, "
                      f"rel. diff {disagree:.1e}", flush=True)
    return rows


def random_model_folder(shape: dict, layers: int, folder: Path, plan: Plan, dtype=torch.bfloat16) -> Path:
    """A random-init Llama of `shape` with `layers` blocks, saved as a Hugging Face folder (no tokenizer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype if not plan.dry else torch.float32)
    model.save_pretrained(folder)
    del model
    return folder


def time_gptq(plan: Plan, work: Path) -> list[dict]:
    from llmquant import QuantConfig
    from llmquant.quantization.streaming import quantize_to_disk

    rows = []
    for label, (shape, layers, real_layers) in plan.gptq_models.items():
        folder = random_model_folder(shape, layers, work / label, plan)
        per_block = {}
        for windows in plan.calibration_sizes:
            calibration = torch.randint(0, shape["vocab_size"], (windows, plan.seqlen))
            start = time.perf_counter()
            _, report = quantize_to_disk(folder, QuantConfig(method="gptq", bits=4, group_size=plan.group_size), calibration,
                                         work / f"{label}-gptq-{windows}", progress=False, plots=False,
                                         device=plan.device)
            total = time.perf_counter() - start
            blocks = report["block_seconds"][1:] or report["block_seconds"]  # the first also warms up the kernels
            per_block[windows] = sum(blocks) / len(blocks)
            rows.append({"model": label, "windows": windows, "seqlen": plan.seqlen, "blocks": layers,
                         "seconds": total, "seconds_per_block": per_block[windows],
                         "peak_gpu_mib": report.get("peak_gpu_mib"), "placement": report.get("placement")})
            print(f"gptq {label} {windows} x {plan.seqlen}: {per_block[windows]:.2f} s per block, "
                  f"{total:.1f} s in all, peak GPU {report.get('peak_gpu_mib')} MiB", flush=True)
        (few, more) = plan.calibration_sizes
        per_window = (per_block[more] - per_block[few]) / (more - few)
        fixed = per_block[few] - few * per_window
        rows.append({"model": label, "projection": True, "windows": 128, "seqlen": plan.seqlen,
                     "seconds_per_block": fixed + 128 * per_window, "blocks": real_layers,
                     "minutes": real_layers * (fixed + 128 * per_window) / 60})
        print(f"gptq {label}: projected {rows[-1]['minutes']:.1f} min for 128 x {plan.seqlen} and {real_layers} blocks",
              flush=True)
    return rows


def decode_speed(plan: Plan, work: Path) -> list[dict]:
    rows = []
    for label, (shape, layers) in plan.decode_models.items():
        rows += _decode_speed_of(plan, work, label, shape, layers)
    return rows


def _decode_speed_of(plan: Plan, work: Path, label: str, shape: dict, layers: int) -> list[dict]:
    import llmquant
    from llmquant import QuantConfig
    from llmquant.inference.generation import compiled_decode_options
    from llmquant.quantization.streaming import quantize_to_disk

    slug = label.split(",")[0]
    folder = random_model_folder(shape, layers, work / f"decode-{slug}-fp", plan, dtype=torch.float16)
    models = {plan.fp_label: folder}
    for name, config in (("W4A16 (GPTQ g128)", QuantConfig(method="rtn", bits=4, group_size=plan.group_size)),
                         ("W8A8 (dynamic)", QuantConfig(method="w8a8"))):
        models[name], _ = quantize_to_disk(folder, config, None, work / f"decode-{slug}-{name.split()[0]}",
                                           progress=False, plots=False, device=plan.device)
    rows = []
    for name, path in models.items():
        model = llmquant.load(path, device=plan.device, dtype=plan.dtype)
        for compiled in (False, True):
            options = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            if compiled:
                options.update(compiled_decode_options(model, plan.compile_backend))
            for batch in plan.decode_batches:
                ids = torch.randint(0, shape["vocab_size"], (batch, 16), device=plan.device)
                with torch.no_grad():
                    # tunes the kernels; compiled: compiles (and captures) for these shapes
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens, **options)
                    synchronize(plan.device)
                    first = time.perf_counter() - start
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=plan.new_tokens, min_new_tokens=plan.new_tokens, **options)
                    synchronize(plan.device)
                seconds = time.perf_counter() - start
                rows.append({"shape": label, "model": name, "compiled": compiled, "batch": batch,
                             "new_tokens": plan.new_tokens, "tokens_per_second": batch * plan.new_tokens / seconds,
                             "first_call_seconds": first})
                print(f"decode {label} {name}{' compiled' if compiled else ''} batch {batch}: "
                      f"{rows[-1]['tokens_per_second']:.1f} tok/s (first call {first:.1f} s)", flush=True)
        del model
    fp = {(r["compiled"], r["batch"]): r["tokens_per_second"] for r in rows if r["model"] == plan.fp_label}
    for r in rows:
        r["vs_fp16"] = r["tokens_per_second"] / fp[(r["compiled"], r["batch"])]
    return rows


def targets(results: dict, plan: Plan) -> list[str]:
    """The GPU issue's targets, each with what this run measured."""
    lines = []
    if plan.dry:
        return ["(dry run: tiny shapes on a CPU under the Triton interpreter; no target applies)"]
    speed = results.get("kernel_speed", [])

    def worst(kind, batches):  # over the 4096-class shapes of the run
        values = [r["speedup"] for r in speed if r["kernel"] == kind and r["M"] in batches]
        return min(values) if values else None

    for layout in DECODE_PATH_LAYOUTS:
        gemv = [r["gemv_vs_fp16"] for r in results.get("decode_paths", []) if r["M"] == 1 and r["layout"] == layout]
        if gemv:
            lines.append(f"- W4A16 GEMV ({layout} layout) >= 3x fp16 at M=1 (kernel alone): worst {min(gemv):.2f}x -> "
                         f"{'met' if min(gemv) >= 3.0 else 'NOT met'}")
    for text, kind, batches, goal in (("W4A16 >= 3x fp16 at M=1", "w4a16-gptq-sym", [1], 3.0),
                                      ("W4A16 >= 2.5x fp16 at M=16", "w4a16-gptq-sym", [16], 2.5),
                                      ("W8A8 >= 1.5x fp16 at M >= 512", "w8a8", [512, 4096], 1.5),
                                      ("W8A8-FP8 >= 1.5x fp16 at M >= 512", "fp8", [512, 4096], 1.5),
                                      ("FP8 weight-only, 128 x 128 blocks, >= 1.5x fp16 at M=1", "fp8-block", [1], 1.5)):
        value = worst(kind, batches)
        lines.append(f"- {text}: " + ("not measured" if value is None else
                                      f"worst {value:.2f}x -> {'met' if value >= goal else 'NOT met'}"))
    compiled = [r["vs_fp16"] for r in results.get("decode", [])
                if r["compiled"] and "8B" in r["shape"] and r["model"].startswith("W4A16") and r["batch"] == 1]
    lines.append("- compiled W4A16 decode >= 2x compiled fp16 decode, 8B shape, batch 1: "
                 + ("not measured" if not compiled else
                    f"{compiled[0]:.2f}x -> {'met' if compiled[0] >= 2.0 else 'NOT met'}"))
    projection = [r for r in results.get("gptq", []) if r.get("projection") and "8B" in r["model"]]
    if projection:
        minutes = projection[0]["minutes"]
        lines.append(f"- GPTQ w4 g128 of the 8B shape, 128 x 2048 calibration, projected <= 10 min: "
                     f"{minutes:.1f} min -> {'met' if minutes <= 10 else 'NOT met'}")
    return lines


def markdown(results: dict, plan: Plan, command: str) -> str:
    lines = ["# GPU check", "", f"Device: {results['device']}; torch {results['torch']}, triton {results['triton']}, "
             f"transformers {results['transformers']}; activations {results['dtype']}.", "",
             f"Command: `{command}`", ""]
    if plan.dry:
        lines += ["**Dry run on a CPU** (tiny shapes, Triton interpreter): these numbers check that the script runs; "
                  "they are not GPU figures.", ""]
    lines += ["## Targets", "", *targets(results, plan), ""]
    lines += ["## Kernels against dequantize-then-matmul (max |Δ| / max |reference|)", "",
              "| kernel | K | N | M | rel. error | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['K']} | {r['N']} | {r['M']} | {r['rel_error']:.1e} | {'yes' if r['ok'] else 'NO'} |"
              for r in results.get("kernel_check", [])]
    lines += ["", "## Kernel time against torch fp16 matmul (same shape, same run)", "",
              "| kernel | K | N | M | µs | fp16 µs | × fp16 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['K']} | {r['N']} | {r['M']} | {r['us']:.1f} | {r['fp16_us']:.1f} | {r['speedup']:.2f} |"
              for r in results.get("kernel_speed", [])]
    lines += ["", "## W4A16 at decode batch sizes: the GEMV (M <= 8) against the tiled kernel and fp16 matmul", "",
              "| layout | K | N | M | GEMV µs | tiled µs | fp16 µs | GEMV × fp16 | GEMV × tiled | rel. diff | ok |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['K']} | {r['N']} | {r['M']} | {r['gemv_us']:.1f} | {r['tiled_us']:.1f} | {r['fp16_us']:.1f} | "
              f"{r['gemv_vs_fp16']:.2f} | {r['gemv_vs_tiled']:.2f} | {r['rel_difference']:.1e} | {'yes' if r['ok'] else 'NO'} |"
              for r in results.get("decode_paths", [])]
    lines += ["", "## R4's fast Hadamard transform against the dense product x @ H (same dtype, same run)", "",
              "| n | M | µs | dense µs | × dense | rel. error | ok |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['M']} | {r['us']:.1f} | {r['dense_us']:.1f} | {r['speedup']:.2f} | {r['rel_error']:.1e} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in results.get("hadamard", [])]
    lines += ["", "## GPTQ w4 g128, streamed on the device (random-init models, random token windows)", "",
              "| model | windows x tokens | blocks run | s per block | total s | peak GPU MiB |", "|---|---|---|---|---|---|"]
    for r in results.get("gptq", []):
        if r.get("projection"):
            lines.append(f"| {r['model']} **projected** | 128 x {r['seqlen']} | {r['blocks']} (all) | "
                         f"{r['seconds_per_block']:.2f} | {60 * r['minutes']:.0f} ({r['minutes']:.1f} min) | – |")
        else:
            lines.append(f"| {r['model']} | {r['windows']} x {r['seqlen']} | {r['blocks']} | {r['seconds_per_block']:.2f} | "
                         f"{r['seconds']:.1f} | {r['peak_gpu_mib'] if r['peak_gpu_mib'] is None else round(r['peak_gpu_mib'])} |")
    lines += ["", "Projection: seconds per block measured at two calibration sizes (the first block left out: it "
              "also tunes the kernels), extended linearly to 128 windows, times the real model's block count.",
              "", "## Greedy decode (random-init models, 16-token prompt)", "",
              "Compiled: static KV cache + torch.compile(fullgraph) of the decode step with CUDA graphs "
              "(llmquant.inference.generation); × fp16 against fp16 run the same way (eager or compiled). First call: the "
              "kernels' tuning, and the compilation for compiled rows.", "",
              "| shape | model | compiled | batch | new tokens | tok/s | × fp16 | first call s |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['model']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} | {r['new_tokens']} | "
              f"{r['tokens_per_second']:.1f} | {r['vs_fp16']:.2f} | {r['first_call_seconds']:.1f} |"
              for r in results.get("decode", [])]
    if results.get("skipped"):
        lines += ["", "Not run (time budget): " + ", ".join(results["skipped"])]
    if results.get("errors"):
        lines += ["", "Errors:", *[f"- {name}: {text}" for name, text in results["errors"].items()]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, kernels under the interpreter")
    parser.add_argument("--out", default=str(ROOT / "eval" / "runs"), help="folder for GPU.md and gpu-check.json")
    parser.add_argument("--budget", type=float, default=450, help="seconds; sections that would start later are skipped")
    parser.add_argument("--sections", nargs="+", default=["kernel_check", "kernel_speed", "decode_paths", "hadamard",
                                                            "gptq", "decode"])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=None,
                        help="only these kernels in the kernel sections (default: all)")
    args = parser.parse_args(argv)
    plan = Plan(args.dry, args.kernels)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no GPU is visible; use --dry on a CPU")
    import transformers
    import triton

    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if not args.dry else f"CPU ({os.cpu_count()} cores), dry run",
               "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
               "dtype": str(plan.dtype).removeprefix("torch."), "skipped": [], "errors": {}}
    sections = {"kernel_check": check_kernels, "kernel_speed": time_kernels, "decode_paths": time_decode_paths,
                "hadamard": time_hadamard, "gptq": lambda p: time_gptq(p, work), "decode": lambda p: decode_speed(p, work)}
    with tempfile.TemporaryDirectory(prefix="llmquant-gpu-check-") as tmp:
        work = Path(tmp)
        for name in args.sections:
            if time.perf_counter() - started > args.budget:
                results["skipped"].append(name)
                continue
            try:
                results[name] = sections[name](plan)
            except Exception as exc:  # one section failing must not lose the others' figures
                import traceback

                traceback.print_exc()
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/gpu_check.py --dry" if args.dry else "bash scripts/gpu_check.sh"
    if args.kernels:
        command += " --kernels " + " ".join(args.kernels)
    (out / "GPU.md").write_text(markdown(results, plan, command))
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print((out / "GPU.md").read_text())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
