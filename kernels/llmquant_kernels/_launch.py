"""Launch configurations: fixed small tiles under the Triton interpreter (CPU), a per-shape tuned
choice among candidates on a GPU.

The interpreter runs one configuration and costs milliseconds per (program x K-tile), so its
tiles are small and K is split only for decode shapes, which keeps the split-K path tested. On a
GPU the first call of each (kernel, M bucket, N, K, dtype) times every candidate with
triton.testing.do_bench and keeps the fastest; split-K candidates are timed through the same
launcher, which zeroes its own output, so repeated trials cannot accumulate.
"""
from __future__ import annotations

import logging
import os

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
log = logging.getLogger("llmquant.kernels")


def _config(block_m, block_n, block_k, split_k=1, num_warps=4, num_stages=3) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": num_warps, "num_stages": num_stages}


# Decode (M <= 16) is memory-bound: narrow M tiles, and split-K so that enough programs stream the
# weight. Larger M is a GEMM: wide tiles, no split.
GPU_CANDIDATES = {
    "decode": [_config(16, n, k, s, w, st) for n, k, s, w, st in (
        (32, 128, 1, 4, 4), (64, 64, 2, 4, 4), (64, 128, 4, 4, 3), (128, 64, 4, 4, 3),
        (64, 256, 2, 4, 3), (128, 128, 2, 8, 3), (32, 256, 8, 4, 3), (64, 128, 8, 4, 4))],
    "small": [_config(m, n, k, s, w, st) for m, n, k, s, w, st in (
        (32, 64, 64, 1, 4, 4), (32, 128, 64, 2, 4, 3), (64, 64, 64, 1, 4, 4), (64, 128, 64, 2, 4, 3),
        (32, 128, 128, 1, 4, 3))],
    "gemm": [_config(m, n, k, 1, w, st) for m, n, k, w, st in (
        (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
        (256, 128, 64, 8, 3), (64, 256, 32, 4, 4))],
}
_TUNED: dict[tuple, dict] = {}


def shape_class(m: int) -> str:
    return "decode" if m <= 16 else "small" if m <= 128 else "gemm"


def interpreter_config(m: int, n: int, k: int) -> dict:
    split = 2 if m <= 16 and k >= 128 else 1
    return _config(16, 32, 32, split, num_warps=1, num_stages=1)


def candidate_does_not_fit() -> tuple[type[BaseException], ...]:
    """The errors that mean "this tile configuration does not fit this GPU" (too much shared memory or
    too many registers, a compile-time assertion on the tile sizes, ptxas refusing it), as Triton's
    own autotuner skips them. Anything else, above all a CUDA error such as an illegal memory access
    (sticky: every later launch in the process fails), is a fault and must not be tuned past."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    kinds = [OutOfResources, CompilationError]  # CompilationError includes CompileTimeAssertionFailure
    try:
        from triton.runtime.errors import PTXASError  # not in every Triton release
        kinds.append(PTXASError)
    except ImportError:
        pass
    return tuple(kinds)


def pick_config(kernel, m: int, n: int, k: int, x: torch.Tensor, launch) -> dict:
    """The launch configuration for this shape: fixed under the interpreter, tuned once per shape on a GPU."""
    if INTERPRETING or x.device.type != "cuda":
        return interpreter_config(m, n, k)
    bucket = 1 << max(m - 1, 0).bit_length()
    key = (kernel, bucket, n, k, x.dtype)
    if key not in _TUNED:
        import triton.testing

        timings, refused = [], None
        for candidate in GPU_CANDIDATES[shape_class(m)]:
            try:
                timings.append((triton.testing.do_bench(lambda: launch(candidate), warmup=5, rep=20), candidate))
            except candidate_does_not_fit() as exc:
                refused = exc
                log.debug("%s M=%d N=%d K=%d: candidate %s skipped: %s", kernel.__name__, m, n, k, candidate, exc)
        if not timings:
            raise RuntimeError(f"no launch configuration of {kernel.__name__} runs for M={m} N={n} K={k}: "
                               f"{type(refused).__name__}: {refused}") from refused
        _TUNED[key] = min(timings, key=lambda t: t[0])[1]
    return _TUNED[key]


def launch_options(config: dict) -> dict:
    """Keyword arguments of a kernel launch: tile sizes, split, warps and stages."""
    options = {k: config[k] for k in LAUNCH_KEYS if k in config}
    if not INTERPRETING:
        options.update(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    return options
