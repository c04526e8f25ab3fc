"""Where a 4-bit layer's dense call overtakes torch's packed op, per CPU class: the measurement behind
capability's row thresholds (a kept dense weight: DENSE_FP32_KEPT_FROM_ROWS on the AVX2 class,
DENSE_KEPT_FROM_ROWS with native bf16), and two facts eval/CPU.md states about the ops themselves.

    OMP_NUM_THREADS=2 python eval/cpu_crossover.py --json eval/cpu-crossover.json

Each class runs in a process of its own (the AVX2 class forced with capability.AVX2_CLASS_VARIABLES). In it,
SmolLM2-135M-shaped GPTQ w4 g128 and AWQ w4 g64 layers (random weights, packed by llmquant's formats,
prepared by prepare_for_cpu as a loaded model's layers are) are called with
the thresholds moved so that every call takes the packed op, then so that every call takes the dense
path (both without FBGEMM's float16 GEMM), then as chosen, beside nn.Linear in fp32, at 1 to 512 rows; best
of --rounds interleaved rounds. W8A8 dynamic on FBGEMM (the class without an int8 dot product) is timed the
same way, its int8 GEMM on split rows as the "packed" column and its codes in float16 as the "dense" one
(w8a8's FBGEMM thresholds moved). NF4 (double quant) layers are timed on the path chosen for them, so that the
table shows every format's call against fp32 at every call size (issue 33's floor, per layer); --layers
picks some. One layer called
again and again keeps its weight in the CPU's cache, which favours the fp32 matmul (SmolLM2's 3.5 MiB fp32
weights fit there; a model's forward reads each weight from memory once): --cycle N calls N copies in
turn, as a forward does. Also, per class:
- the packed int4 op at one row with fp32 and float16 activations against bf16 (why the packed paths
  compute in bf16 on x86);
- torch._int_mm on random int8 codes (64 x 576 x 576) against the exact integer product (inexact where
  oneDNN has no int8 dot product: why W8A8 never calls it there).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmquant.inference.cpu.capability import AVX2_CLASS_VARIABLES  # noqa: E402

CLASSES = {"native": {}, "avx2": AVX2_CLASS_VARIABLES}
SHAPES = ((576, 1536), (1536, 576))
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LAYERS = ("GPTQ w4 g128", "AWQ w4 g64", "W8A8 dynamic", "NF4 double quant")
# The layers whose path depends on the row thresholds: the others are timed as chosen only.
THRESHOLD_LAYERS = ("GPTQ w4 g128", "AWQ w4 g64", "W8A8 dynamic")
NEVER = 10**9


def best_seconds(call, rounds: int, calls: int) -> float:
    call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(rounds: int, layers=LAYERS, cycle: int = 1) -> dict:
    """In this process (its CPU class): the timings and the two op facts."""
    import torch

    from bench_layer_call import build
    from llmquant.inference.cpu import capability, prepare_for_cpu, w8a8

    torch.manual_seed(0)
    rows_out = []
    names = ("DENSE_FP32_FROM_ROWS", "DENSE_FP32_KEPT_FROM_ROWS", "DENSE_FROM_ROWS", "DENSE_KEPT_FROM_ROWS")
    defaults = {(capability, name): getattr(capability, name) for name in names}
    w8a8_names = ("FBGEMM_BELOW_ROWS", "FBGEMM_BESIDE_HALF_BELOW_ROWS")
    defaults.update({(w8a8, name): getattr(w8a8, name) for name in w8a8_names})
    half_off = {capability.HALF_GEMV_ENV: "off", capability.HALF_GEMM_ENV: "off"}
    forced = {"packed": ({(capability, name): NEVER for name in names}, half_off),
              "dense": ({(capability, name): 1 for name in names}, half_off)}
    if w8a8.variant_here() == "fbgemm":
        forced_w8a8 = {"packed": ({(w8a8, name): NEVER for name in w8a8_names}, {}),
                       "dense": ({(w8a8, name): 0 for name in w8a8_names}, {})}
    else:
        forced_w8a8 = {}
    saved_env = {name: os.environ.get(name) for name in half_off}

    def set_thresholds(values: dict, variables: dict) -> None:
        for (module, name), value in values.items():
            setattr(module, name, value)
        for name, value in {**saved_env, **variables}.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    with torch.inference_mode():
        for kind in layers:
            for in_features, out_features in SHAPES:
                copies = [build(kind, in_features, out_features) for _ in range(cycle)]
                paths = prepare_for_cpu(torch.nn.Sequential(*copies), dtype=torch.float32)
                # their speed, not their values
                references = [torch.nn.Linear(in_features, out_features, bias=False) for _ in range(cycle)]
                next_layer, next_reference = itertools.cycle(copies).__next__, itertools.cycle(references).__next__
                for m in ROWS:
                    x = torch.randn(1, m, in_features)
                    calls = max(2000 // m, 8)
                    timing = {}
                    for _ in range(rounds):  # interleaved: every variant once per round
                        timing["fp32"] = min(timing.get("fp32", 1e9),
                                             best_seconds(lambda: next_reference()(x), 1, calls))
                        settings = forced_w8a8 if kind == "W8A8 dynamic" else forced if kind in THRESHOLD_LAYERS else {}
                        for name, (thresholds, variables) in settings.items():
                            set_thresholds(thresholds, variables)
                            timing[name] = min(timing.get(name, 1e9), best_seconds(lambda: next_layer()(x), 1, calls))
                        set_thresholds(defaults, {})
                        timing["chosen"] = min(timing.get("chosen", 1e9),
                                               best_seconds(lambda: next_layer()(x), 1, calls))
                    rows_out.append({"layer": kind, "in": in_features, "out": out_features, "rows": m,
                                     **{f"{k}_us": v * 1e6 for k, v in timing.items()}, "path": paths[0].detail})
        layer = build("GPTQ w4 g128", *SHAPES[0])
        prepare_for_cpu(torch.nn.Sequential(layer), dtype=torch.float32)
        kernel = layer.prepared.kernel
        x = torch.randn(1, kernel.packed.shape[1] * 2)
        packed_dtype = {}
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            sz = kernel.scales_and_zeros.to(dtype)
            xd = x.to(dtype)
            packed_dtype[str(dtype).removeprefix("torch.")] = best_seconds(
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xd, kernel.packed, kernel.run, sz), rounds, 50) * 1e6
        generator = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (64, 576), dtype=torch.int8, generator=generator)
        b = torch.randint(-128, 128, (576, 576), dtype=torch.int8, generator=generator)
        exact = a.double() @ b.double()
        int_mm = torch._int_mm(a, b).double()
        int_mm_error = float((int_mm - exact).norm() / exact.norm())
    return {"cpu_class": capability.describe(), "cycle": cycle,
            "thresholds": {name: value for (_, name), value in defaults.items()},
            "float16_gains": capability.half_gains(torch.get_num_threads()),
            "float16_every_call": capability.half_takes_every_call(),
            "threads": torch.get_num_threads(), "rows": rows_out, "packed_int4_one_row_us": packed_dtype,
            "int_mm_relative_error": int_mm_error}


def crossover(rows: list[dict]) -> int | None:
    """The fewest rows from which the dense path is at least as fast as the packed op at every size."""
    if "dense_us" not in rows[0]:
        return None
    losing = [r["rows"] for r in rows if r["dense_us"] > r["packed_us"]]
    wins_after = [r["rows"] for r in rows if not losing or r["rows"] > max(losing)]
    return min(wins_after) if wins_after else None


def table(results: dict) -> str:
    lines = []
    for name, result in results.items():
        lines.append(f"\n{name}: {result['cpu_class']}; thresholds {result['thresholds']}; "
                     f"{result['threads']} threads; {result.get('cycle', 1)} copies of each layer called in turn; "
                     f"FBGEMM's float16 GEMM against fp32 (one row, many) {result.get('float16_gains')}, "
                     f"taking every call: {result.get('float16_every_call')}")
        lines.append("| layer | in -> out | rows | fp32 (us) | packed op (us) | dense (us) | chosen (us) | "
                     "fp32 / packed | fp32 / dense | fp32 / chosen |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            forced = [r.get(f"{name}_us") for name in ("packed", "dense")]
            cells = [f"{us:.1f}" if us else "–" for us in forced] + [f"{r['chosen_us']:.1f}"]
            ratios = [f"{r['fp32_us'] / us:.2f}" if us else "–" for us in forced + [r["chosen_us"]]]
            lines.append(f"| {r['layer']} | {r['in']} -> {r['out']} | {r['rows']} | {r['fp32_us']:.1f} | "
                         + " | ".join(cells + ratios) + " |")
        groups = {}
        for r in result["rows"]:
            groups.setdefault((r["layer"], r["in"], r["out"]), []).append(r)
        slowest = min(result["rows"], key=lambda r: r["fp32_us"] / r["chosen_us"])
        lines.append(f"- slowest chosen path against fp32: {slowest['layer']} {slowest['in']} -> {slowest['out']} at "
                     f"{slowest['rows']} rows, {slowest['fp32_us'] / slowest['chosen_us']:.2f}x")
        for key, group in groups.items():
            if key[0] not in THRESHOLD_LAYERS or "dense_us" not in group[0]:
                continue
            lines.append(f"- {key[0]} {key[1]} -> {key[2]}: dense at least as fast as packed from "
                         f"{crossover(group)} rows on")
        one_row = result["packed_int4_one_row_us"]
        lines.append(f"- packed int4 op at one row: " + ", ".join(
            f"{dtype} {us:.1f} us ({us / one_row['bfloat16']:.1f}x bf16)" for dtype, us in one_row.items()))
        lines.append(f"- torch._int_mm relative error against the exact product: {result['int_mm_relative_error']:.3g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS),
                        help="the layers to time (default: all)")
    parser.add_argument("--cycle", type=int, default=1,
                        help="call this many copies of each layer in turn (different weights), so that each call "
                             "reads its weight from memory as a model's forward does, not from the cache")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.rounds, args.layers, args.cycle)))
        return
    root = Path(__file__).resolve().parent.parent
    results = {}
    for name in args.classes:
        env = dict(os.environ, **CLASSES[name],
                   PYTHONPATH=os.pathsep.join([str(root), str(root / "kernels"), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds),
                               "--layers", *args.layers, "--cycle", str(args.cycle)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the {name} class run failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    text = table(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv),
                                         "load_average_after": os.getloadavg(), "classes": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
