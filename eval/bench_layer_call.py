"""The time of one eager call of each quantized linear on the CPU, beside nn.Linear in fp32: at one row
(a decode step, where the dispatch around the arithmetic shows) and at a prefill's rows. Given several
source trees (--trees), each runs in a process of its own with that tree first on the path, rounds
interleaved, and the table puts the trees side by side: what a change to the layers' dispatch (the op
registry, the prepared-weight check) costs per call.

    OMP_NUM_THREADS=1 python eval/bench_layer_call.py --trees . /tmp/llmquant-12cc656 \\
        --json eval/layer-call.json --md eval/layer-call.md

(a tree of an older revision: `git worktree add /tmp/llmquant-12cc656 12cc656`). SmolLM2-135M's widths:
576 -> 576 (q / o), 576 -> 1536 (gate / up); random weights, packed by llmquant's own formats and loaded
through each layer's load_state_dict, then prepared for the CPU by prepare_for_cpu as a loaded model's
layers are (the JSON records each layer's path). Best of --rounds rounds of --calls calls each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((576, 576), (576, 1536))
ROWS = (1, 128)
LAYERS = ("fp32 nn.Linear", "GPTQ w4 g128", "AWQ w4 g64", "W8A8 dynamic", "NF4 double quant")


def build(kind: str, in_features: int, out_features: int):
    import torch

    from llmquant import QuantConfig
    from llmquant.formats import FORMATS
    from llmquant.grid import AffineGrid
    from llmquant.grid.codebook import CodebookGrid
    from llmquant.inference.nn import AWQLinear, BnB4bitLinear, GPTQLinear, W8A8Linear

    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    if kind == "fp32 nn.Linear":
        layer = torch.nn.Linear(in_features, out_features, bias=False)
        layer.weight.data.copy_(weight)
        return layer
    if kind == "GPTQ w4 g128":
        tensors = FORMATS["gptq"].pack(AffineGrid(4, True, 128, min_zero=1).quantize(weight),
                                       QuantConfig(bits=4, group_size=128))
        layer = GPTQLinear(in_features, out_features, 4, 128, -(-in_features // 128), dtype=torch.float32)
    elif kind == "AWQ w4 g64":
        tensors = FORMATS["awq"].pack(AffineGrid(4, False, 64).quantize(weight),
                                      QuantConfig(bits=4, group_size=64, sym=False, format="awq"))
        layer = AWQLinear(in_features, out_features, 64, dtype=torch.float32)
    elif kind == "W8A8 dynamic":
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        tensors = {"weight": torch.round(weight / scale).to(torch.int8), "weight_scale": scale}
        layer = W8A8Linear(in_features, out_features, dtype=torch.float32)
    elif kind == "NF4 double quant":
        tensors = FORMATS["bitsandbytes"].pack(CodebookGrid("nf4", 64, True).quantize(weight),
                                               QuantConfig(method="nf4", double_quant=True))
        nested = tensors["weight.nested_absmax"].numel()
        layer = BnB4bitLinear(in_features, out_features, "nf4", tensors["weight.absmax"].numel(), nested,
                              dtype=torch.float32)
    else:
        raise ValueError(kind)
    layer.load_state_dict(tensors)
    return layer


def measure(calls: int, rounds: int, layers: list[str]) -> list[dict]:
    """In this process (the tree on sys.path): best microseconds per call of every layer x shape x rows."""
    import torch

    from llmquant.inference.cpu import prepare_for_cpu

    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    with torch.inference_mode():
        for kind in layers:
            for in_features, out_features in SHAPES:
                layer = build(kind, in_features, out_features)
                paths = prepare_for_cpu(torch.nn.Sequential(layer), dtype=torch.float32)  # as loading does
                path = paths[0].path + f" ({paths[0].detail})" if paths else "fp32"
                for m in ROWS:
                    x = torch.randn(1, m, in_features)
                    layer(x)
                    n = max(calls // m, 20)
                    best = float("inf")
                    for _ in range(rounds):
                        start = time.perf_counter()
                        for _ in range(n):
                            layer(x)
                        best = min(best, (time.perf_counter() - start) / n)
                    rows.append({"layer": kind, "in": in_features, "out": out_features, "rows": m, "us": best * 1e6,
                                 "path": path})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", default=["."], help="source trees to compare (the first is the baseline)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round at one row (fewer at more rows)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="processes per tree, interleaved; best taken")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.calls, args.rounds, args.layers)))
        return
    trees = [str(Path(t).resolve()) for t in args.trees]
    best: dict[str, dict[tuple, float]] = {tree: {} for tree in trees}
    paths: dict[str, dict[tuple, str]] = {tree: {} for tree in trees}
    for _ in range(args.repeats):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, str(Path(tree) / "kernels")]))
            out = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls), "--rounds",
                                  str(args.rounds), "--layers", *args.layers], env=env, cwd=tree, capture_output=True, text=True, check=True)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                key = (row["layer"], row["in"], row["out"], row["rows"])
                best[tree][key] = min(best[tree].get(key, float("inf")), row["us"])
                paths[tree][key] = row["path"]
    revisions = [subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() + ("+" if subprocess.run(
                                    ["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip() else "") for tree in trees]
    base = trees[0]
    header = "| layer | in -> out | rows | " + " | ".join(f"{r} (us)" for r in revisions) + \
        "".join(f" | {r} / {revisions[0]}" for r in revisions[1:]) + " |"
    lines = [header, "|" + "---|" * (3 + 2 * len(trees) - 1)]
    for key in best[base]:
        cells = [f"{best[tree][key]:.1f}" for tree in trees]
        ratios = [f"{best[tree][key] / best[base][key]:.3f}" for tree in trees[1:]]
        lines.append(f"| {key[0]} | {key[1]} -> {key[2]} | {key[3]} | " + " | ".join(cells + ratios) + " |")
    table = "\n".join(lines)
    print(table)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    if args.json:
        args.json.write_text(json.dumps({"trees": dict(zip(revisions, trees)), "threads": threads,
                                         "cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                                         "rows": [{"revision": r, "layer": k[0], "in": k[1], "out": k[2], "rows": k[3],
                                                   "us": best[t][k], "path": paths[t][k]} for r, t in zip(revisions, trees)
                                                  for k in best[t]]}, indent=1) + "\n")
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
