"""Launch configurations: fixed small tiles under the Triton interpreter (CPU), a per-shape tuned
choice among candidates on a GPU.

The interpreter runs one configuration and costs milliseconds per (program x K-tile), so its
tiles are small and K is split only for decode shapes, which keeps the split-K path tested. On a
GPU the first call of each (kernel, M bucket, N, K, dtype) times every candidate with
triton.testing.do_bench and keeps the fastest; split-K candidates are timed through the same
launcher, which zeroes its own output, so repeated trials cannot accumulate.

Each kernel declares its launch space once, beside its code (a KernelSpec): the candidates its
launcher chooses from, the constexpr variants and dtypes it is specialized on, and its argument
types. The launcher, the ahead-of-time compile proof (aot.py) and the recorded table of what
every candidate needs on each GPU target (compiled.json, written by aot.py) all read that one
declaration, so a candidate the launcher can choose is a candidate that was compiled. On a GPU the
candidates that the table says cannot launch there (more shared memory than the device has, or a
compile error for its target) are dropped before tuning instead of being found by a failed launch.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K")
RECORDED_TABLE = Path(__file__).with_name("compiled.json")
log = logging.getLogger("llmquant.kernels")


def _config(block_m, block_n, block_k, split_k=1, num_warps=4, num_stages=3) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k,
            "num_warps": num_warps, "num_stages": num_stages}


# Decode (M <= 16) is memory-bound: narrow M tiles, and split-K so that enough programs stream the
# weight. Larger M is a GEMM: wide tiles, no split. The last of each class is double- rather than
# triple- or quadruple-buffered: the AWQ and NF4 kernels stage a gathered word or code per weight
# value through shared memory, and on a 99 KB part (sm_86 / sm_89) nothing else of theirs fits.
GPU_CANDIDATES = {
    "decode": [_config(16, n, k, s, w, st) for n, k, s, w, st in (
        (32, 128, 1, 4, 4), (64, 64, 2, 4, 4), (64, 128, 4, 4, 3), (128, 64, 4, 4, 3),
        (64, 256, 2, 4, 3), (128, 128, 2, 8, 3), (32, 256, 8, 4, 3), (64, 128, 8, 4, 4), (64, 64, 2, 4, 2))],
    "small": [_config(m, n, k, s, w, st) for m, n, k, s, w, st in (
        (32, 64, 64, 1, 4, 4), (32, 128, 64, 2, 4, 3), (64, 64, 64, 1, 4, 4), (64, 128, 64, 2, 4, 3),
        (32, 128, 128, 1, 4, 3), (32, 64, 64, 1, 4, 2))],
    "gemm": [_config(m, n, k, 1, w, st) for m, n, k, w, st in (
        (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
        (256, 128, 64, 8, 3), (64, 256, 32, 4, 4), (64, 128, 32, 4, 2))],
    # GEMV (M <= GEMV_MAX_M): BLOCK_M is M rounded up to a power of two, so no row is padding
    # beyond that; each program streams BLOCK_K x BLOCK_N of packed weight per step, split K ways.
    # Its accumulator holds BLOCK_M x (BLOCK_K / values per word) x BLOCK_N partial sums, so wider
    # M takes narrower steps to stay in registers.
    "gemv": [_config(m, n, k, s, w, st) for m, shapes in (
        (1, ((128, 128, 8, 4, 2), (256, 64, 8, 4, 2), (64, 256, 8, 4, 2), (256, 128, 4, 8, 2))),
        (2, ((128, 128, 8, 4, 2), (256, 64, 8, 4, 2), (64, 256, 8, 4, 2), (256, 128, 4, 8, 2))),
        (4, ((128, 64, 8, 4, 2), (256, 32, 8, 4, 2), (64, 128, 8, 4, 2), (256, 64, 4, 8, 2))),
        (8, ((128, 32, 8, 4, 2), (64, 64, 8, 4, 2), (128, 64, 8, 8, 2), (256, 32, 4, 8, 2))),
    ) for n, k, s, w, st in shapes],
}
GEMV_MAX_M = 8
_TUNED: dict[tuple, dict] = {}

# Shared memory one block may use (bytes, opt-in maximum) by compute capability: what a device of
# that capability offers when torch cannot say, and the "fits" column of the recorded table.
SHARED_MEMORY_PER_BLOCK = {(7, 0): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
                           (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}


def shape_class(m: int) -> str:
    return "decode" if m <= 16 else "small" if m <= 128 else "gemm"


def gemv_block_m(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()


def interpreter_config(m: int, n: int, k: int) -> dict:
    split = 2 if m <= 16 and k >= 128 else 1
    return _config(16, 32, 32, split, num_warps=1, num_stages=1)


def interpreter_gemv_config(m: int, n: int, k: int) -> dict:
    # BLOCK_K 32 holds whole words at every bit width (3-bit values straddle words in runs of 32)
    return _config(gemv_block_m(m), 32, 32, 2 if k >= 64 else 1, num_warps=1, num_stages=1)


def config_id(config: dict) -> str:
    """A configuration as one short string: the key of the recorded table and of its markdown rows."""
    parts = [f"{key.removeprefix('BLOCK_').lower()}{config[key]}" for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
             if key in config]
    if "SPLIT_K" in config:
        parts.append(f"s{config['SPLIT_K']}")
    return " ".join(parts + [f"w{config.get('num_warps', 4)}", f"st{config.get('num_stages', 3)}"])


@dataclass(frozen=True)
class KernelSpec:
    """What one Triton kernel takes on a GPU, declared beside it.

    space: the candidates its launcher chooses from ("tiled": GPU_CANDIDATES decode/small/gemm by M;
    "gemv": GPU_CANDIDATES["gemv"] by M rounded up; or an explicit `configs` list). variants: the
    constexpr sets that change the generated code (bit widths, layouts), by label; fixed: the other
    constexprs, compiled at the value that generates the most code (with a bias, a zero offset).
    dtypes: the activation dtypes the launcher is keyed by on a GPU (the output dtypes when
    keyed_by_output: the int8 GEMM, whose inputs are always int8).
    argument_types(dtype, constants): the Triton type of every runtime argument (constants: the
    variant's, the fixed and the configuration's constexprs), for aot.py.
    targets: the compute capabilities compiled for (FP8 e4m3 needs 8.9).
    """
    name: str
    kernel: object
    space: str
    variants: dict[str, dict]
    argument_types: Callable[[str, dict], dict]
    fixed: dict = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    targets: tuple[int, ...] = (80, 90)
    configs: tuple[dict, ...] = ()
    keyed_by_output: bool = False

    def gpu_configs(self) -> list[dict]:
        """Every configuration the launcher can choose on a GPU."""
        if self.configs:
            return list(self.configs)
        if self.space == "gemv":
            return list(GPU_CANDIDATES["gemv"])
        return [c for name in ("decode", "small", "gemm") for c in GPU_CANDIDATES[name]]

    def candidates(self, m: int) -> list[dict]:
        """The configurations the launcher tunes among for M rows."""
        if self.configs:
            return list(self.configs)
        if self.space == "gemv":
            return [c for c in GPU_CANDIDATES["gemv"] if c["BLOCK_M"] == gemv_block_m(m)]
        return GPU_CANDIDATES[shape_class(m)]

    def variant_of(self, constants: dict) -> str:
        for label, values in self.variants.items():
            if all(constants.get(key) == value for key, value in values.items()):
                return label
        raise ValueError(f"{self.name}: no declared variant has {constants}")

    def minimum_capability(self) -> tuple[int, int]:
        return divmod(min(self.targets), 10)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def pointer(dtype: str) -> str:
    """The Triton pointer type of a tensor of this (torch) dtype name."""
    return "*" + TRITON_TYPES[dtype]


def out_pointer(dtype: str, constants: dict) -> str:
    """run_tiled's output: an fp32 buffer when K is split (partial sums are added atomically)."""
    return "*fp32" if constants.get("SPLIT_K", 1) > 1 else pointer(dtype)


@functools.lru_cache(maxsize=1)
def recorded_table() -> dict:
    """(kernel, variant, dtype, config id, target) -> the recorded compile of that combination
    (shared bytes, registers, spills, error), from compiled.json; empty when there is none."""
    try:
        data = json.loads(RECORDED_TABLE.read_text())
    except FileNotFoundError:
        return {}
    return {(r["kernel"], r["variant"], r["dtype"], r["config"], r["target"]): r for r in data["rows"]}


def recorded_target(capability: tuple[int, int], targets: tuple[int, ...]) -> int | None:
    """The compiled target whose numbers stand for a device of this capability: the highest one of
    the same major version not above it (sm_86 is compiled as sm_80), else none."""
    same_major = [t for t in targets if t // 10 == capability[0] and t <= capability[0] * 10 + capability[1]]
    return max(same_major, default=None)


def device_limits(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, shared memory one block may use) of a CUDA device."""
    capability = tuple(torch.cuda.get_device_capability(device))
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    return capability, shared or SHARED_MEMORY_PER_BLOCK.get(capability, 49152)


def launchable(spec: KernelSpec, variant: str, dtype: str, candidates: list[dict], capability: tuple[int, int],
               shared_limit: int) -> list[dict]:
    """The candidates that can launch on a device: those whose recorded compile for its target
    fits its shared memory and did not fail. A candidate without a record (a target never
    compiled for, such as a newer GPU) is kept: the tuner's own refusal handling covers it."""
    if capability < spec.minimum_capability():
        need = ".".join(map(str, spec.minimum_capability()))
        raise RuntimeError(f"{spec.name} needs a GPU of compute capability {need} or higher, this one is "
                           f"{capability[0]}.{capability[1]}")
    target = recorded_target(capability, spec.targets)
    table = recorded_table()
    kept = []
    for candidate in candidates:
        record = table.get((spec.name, variant, dtype, config_id(candidate), target))
        if record is not None and (record["error"] or record["shared"] > shared_limit):
            log.debug("%s %s %s: %s dropped on sm_%d%d (%s)", spec.name, variant, dtype, config_id(candidate),
                      *capability, record["error"] or f"{record['shared']} bytes of shared memory")
            continue
        kept.append(candidate)
    return kept


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


def pick_config(spec: KernelSpec, constants: dict, m: int, n: int, k: int, x: torch.Tensor, launch,
                dtype: torch.dtype | None = None) -> dict:
    """The launch configuration for this shape: fixed under the interpreter, tuned once per shape on a
    GPU among the candidates that can launch there. dtype: what the kernel is keyed by (x's dtype
    unless given)."""
    if INTERPRETING or x.device.type != "cuda":
        return (interpreter_gemv_config if spec.space == "gemv" else interpreter_config)(m, n, k)
    dtype = dtype or x.dtype
    variant = spec.variant_of(constants)
    bucket = 1 << max(m - 1, 0).bit_length()
    key = (spec.name, variant, bucket, n, k, dtype, x.device)
    if key not in _TUNED:
        import triton.testing

        capability, shared_limit = device_limits(x.device)
        candidates = launchable(spec, variant, dtype_name(dtype), spec.candidates(m), capability, shared_limit)
        timings, refused = [], None
        for candidate in candidates:
            try:
                timings.append((triton.testing.do_bench(lambda: launch(candidate), warmup=5, rep=20), candidate))
            except candidate_does_not_fit() as exc:
                refused = exc
                log.debug("%s M=%d N=%d K=%d: candidate %s skipped: %s", spec.name, m, n, k, candidate, exc)
        if not timings:
            why = f"{type(refused).__name__}: {refused}" if refused else "the recorded table drops every candidate"
            raise RuntimeError(f"no launch configuration of {spec.name} ({variant}, {dtype_name(dtype)}) runs for "
                               f"M={m} N={n} K={k} on this GPU: {why}") from refused
        _TUNED[key] = min(timings, key=lambda t: t[0])[1]
    return _TUNED[key]


def launch_options(config: dict) -> dict:
    """Keyword arguments of a kernel launch: tile sizes, split, warps and stages."""
    options = {k: config[k] for k in LAUNCH_KEYS if k in config}
    if not INTERPRETING:
        options.update(num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))
    return options
