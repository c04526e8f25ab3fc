"""Time GPTQ on one square linear layer (default 4096 x 4096, the size of a 7B model's q_proj).

    python eval/bench_gptq_layer.py --size 4096 --group-size 128 --repeats 2

A benchmark, not a test: it prints seconds per layer for plain GPTQ and act-order, next to RTN.
The Hessian comes from random correlated inputs; the time does not depend on the values.
"""
from __future__ import annotations

import argparse
import time

import torch

from llmquant.algorithms.gptq import gptq_quantize
from llmquant.grid import AffineGrid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rows", type=int, default=8192, help="calibration rows behind the Hessian")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.size) @ (torch.randn(args.size, args.size) / args.size**0.5)
    hessian = 2 * x.t() @ x / args.rows
    weight = torch.randn(args.size, args.size) * 0.02
    grid = AffineGrid(args.bits, False, args.group_size, min_zero=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, layer {args.size}x{args.size}, "
          f"w{args.bits} g{args.group_size}")
    for label, run in (("rtn", lambda: grid.quantize(weight)),
                       ("gptq", lambda: gptq_quantize(weight, hessian, grid)),
                       ("gptq act-order", lambda: gptq_quantize(weight, hessian, grid, act_order=True))):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"{label:16s} best {min(times):7.2f} s   runs {', '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()
