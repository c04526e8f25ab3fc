"""The fast Hadamard transform (ops.hadamard_transform, its CPU path: butterflies, then the small
factor's product) against the dense product x @ H by the same n x n matrix, on the CPU, at the orders
of the models' down_proj inputs (R4's online rotation), float32. Prints a markdown table (eval/RESULTS.md,
"Rotations before rounding"):

    OMP_NUM_THREADS=1 python eval/bench_hadamard.py --rows 1 16 512
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from llmquant.inference import ops
from llmquant.rotation.hadamard import hadamard, hadamard_factors

MODELS = {1536: "SmolLM2-135M", 2048: "SmolLM2-360M", 4864: "Qwen2-0.5B", 8192: "Llama-3.2-1B",
          14336: "Llama-3-8B"}


def seconds(fn, repeat: int) -> float:
    """The best of `repeat` timed calls, after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, nargs="+", default=sorted(MODELS))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print("| n (model) | factors | rows | dense x @ H ms | fast ms | dense / fast | max abs difference |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad(), ops.use_backend("reference"):
        for n in args.orders:
            small, power = hadamard_factors(n)
            dense_h = (hadamard(n) / math.sqrt(n)).float()
            factors = f"{small.shape[0]} x {power}" if small is not None else f"{power} (Sylvester)"
            for rows in args.rows:
                x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
                dense = seconds(lambda: x @ dense_h, args.repeat)
                fast = seconds(lambda: ops.hadamard_transform(x, small, 1 / math.sqrt(n)), args.repeat)
                difference = float((x @ dense_h - ops.hadamard_transform(x, small, 1 / math.sqrt(n))).abs().max())
                print(f"| {n} ({MODELS.get(n, '')}) | {factors} | {rows} | {dense * 1e3:.3f} | {fast * 1e3:.3f} | "
                      f"{dense / fast:.1f} | {difference:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
