"""What this CPU runs fast, asked of torch once: the CPU class llmquant plans its paths for.

On x86 torch's int4 / int8 weight-packed matmuls are vectorized (AVX2 / AVX-512 tinygemm) only for
bfloat16 activations; float32 and float16 inputs take a scalar loop that is slower than an fp32
matmul. So the packed paths compute in bfloat16 there and in the activations' own dtype elsewhere
(aarch64 builds vectorize float32 too). An int8 x int8 -> int32 matmul (`torch._int_mm`) is fast
only where the CPU has an int8 dot-product instruction (VNNI, AMX); without one it is far slower
than an fp32 matmul (and inexact: eval/CPU.md). Where the CPU multiplies bfloat16 natively (AVX-512
BF16, AMX), a dense bf16 matmul (oneDNN) of a few rows already beats the packed ops, which dequantize
inside for every few rows: calls of DENSE_KEPT_FROM_ROWS rows or more run a dense bf16 matmul of a kept
dequantized weight, and of DENSE_FROM_ROWS or more where the weight must be dequantized for the call
(that costs about what a prefill's matmul does). Without native bf16 (the AVX2 class) the same calls run
a dense fp32 matmul instead, from DENSE_FP32_KEPT_FROM_ROWS / DENSE_FP32_FROM_ROWS rows
(capability.dense_fp32_for; the paths say how). Where each path overtakes the packed op, per CPU class:
eval/cpu_crossover.py and eval/CPU.md, "Per call size".

The class follows the overrides torch and oneDNN follow, so that one machine can play a smaller
class: torch.cpu's private probes (`_is_vnni_supported`, `_is_avx512_bf16_supported`,
`_is_amx_tile_supported`) ask the CPU itself (CPUID) and ignore both, so they are only the upper
bound here. `ATEN_CPU_CAPABILITY=avx2` (torch's kernels dispatched to AVX2:
`torch.backends.cpu.get_cpu_capability()` says so) turns the int8 dot product and native bf16 off,
as they are on an AVX2 CPU; `ONEDNN_MAX_CPU_ISA` (or `DNNL_MAX_CPU_ISA`) below AVX512_CORE_VNNI turns
the int8 dot product off (oneDNN runs `_int_mm` and the dense int8 / bf16 GEMMs), below
AVX512_CORE_BF16 native bf16 (AMX alone needs AVX512_CORE_AMX). FBGEMM (W8A8's int8 GEMM without an int8 dot
product, fbgemm_int8.py; float16 weights, fbgemm_half.py) follows only FBGEMM_ENABLE_INSTRUCTIONS, and MKL (torch's
fp32 matmuls) only MKL_ENABLE_INSTRUCTIONS: AVX2_CLASS_VARIABLES caps all four.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ...errors import ConfigError
from . import fbgemm_half

_X86_VECTOR_CAPABILITIES = ("AVX2", "AVX512")
# Rows from which a call runs a dense matmul of the dequantized weight instead of the packed op: with
# native bf16, of the kept bf16 weight / of one dequantized for the call; without it (the AVX2 class,
# where the packed ops compute in emulated bf16), of the kept fp32 weight / of one made for the call.
# The kept thresholds are where the dense call overtook the packed op in eval/cpu_crossover.py.
DENSE_KEPT_FROM_ROWS = 8
DENSE_FROM_ROWS = 128
DENSE_FP32_KEPT_FROM_ROWS = 16
DENSE_FP32_FROM_ROWS = 32
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# What makes a larger x86 CPU play the AVX2 class: torch's, oneDNN's, FBGEMM's (fbgemm_int8.py, fbgemm_half.py)
# and MKL's kernels (the fp32 matmuls, the baseline included) each follow their own cap; the class planned for
# reads the first two.
AVX2_CLASS_VARIABLES = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
                        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# oneDNN's dnnl_cpu_isa names in increasing order (aliases share a rank); ALL is no cap.
_ONEDNN_ISA_RANK = {name: rank for rank, names in enumerate((
    ("SSE41",), ("AVX",), ("AVX2",), ("AVX2_VNNI",), ("AVX2_VNNI_2",), ("AVX512_CORE",), ("AVX512_CORE_VNNI",),
    ("AVX512_CORE_BF16",), ("AVX10_1_512", "AVX512_CORE_FP16"), ("AVX10_1_512_AMX", "AVX512_CORE_AMX"),
    ("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"), ("AVX10_2_512",), ("AVX10_2_512_AMX_2",), ("ALL",),
)) for name in names}


def assume_constant_result(fn):
    """torch.compiler.assume_constant_result, which torch.compile honours by reading the mark it sets (torch's
    _dynamo/decorators.py), set here without importing torch._dynamo, which that function does: 1.5 s and
    ~150 MiB at `import llmquant.api` for every command, compiling or not. tests/test_compiled_decode.py
    checks that the mark is still the one torch sets, and compiles these calls in whole graphs."""
    fn._dynamo_marked_constant = True
    return fn


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private probes; absent from some builds
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _onednn_cap() -> tuple[str, str] | None:
    """(variable, value upper-cased) of the oneDNN ISA cap in effect, or None."""
    for variable in ONEDNN_ISA_VARIABLES:
        value = os.environ.get(variable)
        if value:
            return variable, value.strip().upper()
    return None


def _onednn_allows(cap: tuple[str, str] | None, isa: str) -> bool:
    if cap is None:
        return True
    rank = _ONEDNN_ISA_RANK.get(cap[1])
    return rank is None or rank >= _ONEDNN_ISA_RANK[isa]  # a name oneDNN does not know caps nothing


@dataclass(frozen=True)
class CpuClass:
    capability: str  # torch's dispatch ("AVX512", "AVX2", ...)
    int8_dot_product: bool
    fast_bf16_matmul: bool
    cpu_flags: tuple[str, ...]  # what the CPU itself has (CPUID), whatever is overridden
    reasons: tuple[str, ...] = field(default=())  # why a feature the CPU has is off

    @property
    def name(self) -> str:
        if self.capability == "AVX2":
            return "AVX2"
        features = [f for f, on in (("int8 dot product", self.int8_dot_product), ("native bf16", self.fast_bf16_matmul))
                    if on]
        return f"{self.capability}" + (f" + {' + '.join(features)}" if features else "")

    def describe(self) -> str:
        missing = [f for f, on in (("no int8 dot product", self.int8_dot_product), ("no native bf16", self.fast_bf16_matmul))
                   if not on]
        text = f"{self.name} class"
        if missing:
            text += f" ({', '.join(missing)})"
        text += f"; the CPU has {', '.join(self.cpu_flags) if self.cpu_flags else 'no VNNI / AVX512-BF16 / AMX'}"
        if self.reasons:
            text += f"; off because {'; '.join(self.reasons)}"
        return text


@lru_cache
def cpu_class() -> CpuClass:
    """The class this process plans for (computed once: the variables are read before torch runs)."""
    capability = torch.backends.cpu.get_cpu_capability()
    vnni, bf16, amx = (_cpu_flag(n) for n in ("_is_vnni_supported", "_is_avx512_bf16_supported",
                                              "_is_amx_tile_supported"))
    flags = tuple(n for n, on in (("VNNI", vnni), ("AVX512-BF16", bf16), ("AMX", amx)) if on)
    cap = _onednn_cap()
    reasons = []
    int8_dot, fast_bf16 = vnni or amx, bf16 or amx
    if capability in ("AVX2", "DEFAULT") and (int8_dot or fast_bf16):
        forced = os.environ.get("ATEN_CPU_CAPABILITY")
        reasons.append(f"torch dispatches {capability} kernels"
                       + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else ""))
        int8_dot = fast_bf16 = False
    if int8_dot and not (_onednn_allows(cap, "AVX512_CORE_VNNI") if vnni else _onednn_allows(cap, "AVX512_CORE_AMX")):
        reasons.append(f"{cap[0]}={cap[1]} is below {'AVX512_CORE_VNNI' if vnni else 'AVX512_CORE_AMX'}")
        int8_dot = False
    if fast_bf16 and not (_onednn_allows(cap, "AVX512_CORE_BF16") if bf16 else _onednn_allows(cap, "AVX512_CORE_AMX")):
        reasons.append(f"{cap[0]}={cap[1]} is below {'AVX512_CORE_BF16' if bf16 else 'AVX512_CORE_AMX'}")
        fast_bf16 = False
    return CpuClass(capability, int8_dot, fast_bf16, flags, tuple(reasons))


@assume_constant_result  # fixed for the process: torch.compile reads it at trace time
def cpu_capability() -> str:
    """torch's name for the vector extension its CPU kernels were dispatched to ("AVX512", "AVX2", ...)."""
    return cpu_class().capability


@assume_constant_result  # fixed for the process: torch.compile reads it at trace time
def has_int8_dot_product() -> bool:
    """Whether int8 GEMMs run on a dot-product instruction (AVX-512 VNNI / AMX), in the class planned for."""
    return cpu_class().int8_dot_product


@assume_constant_result  # fixed for the process: torch.compile reads it at trace time
def has_fast_bf16_matmul() -> bool:
    """Whether dense bfloat16 matmuls run natively (AVX-512 BF16 / AMX), in the class planned for."""
    return cpu_class().fast_bf16_matmul


def dense_bf16_for(rows: int, kept: bool = False) -> bool:
    """Whether a call with this many rows runs faster as a dense bfloat16 matmul (`kept`: of a weight
    already dequantized, else of one dequantized for the call)."""
    return rows >= (DENSE_KEPT_FROM_ROWS if kept else DENSE_FROM_ROWS) and has_fast_bf16_matmul()


def dense_fp32_for(rows: int, kept: bool = False) -> bool:
    """Whether a call with this many rows runs faster as a dense fp32 matmul of the dequantized weight (`kept`:
    already dequantized, else for the call) than as the packed op (x86 CPUs without native bf16, where the
    packed ops compute in emulated bf16)."""
    return (rows >= (DENSE_FP32_KEPT_FROM_ROWS if kept else DENSE_FP32_FROM_ROWS) and not has_fast_bf16_matmul()
            and cpu_capability() in _X86_VECTOR_CAPABILITIES)


class DenseCopy:
    """A kernel's dequantized weight for dense calls (fp32 on the AVX2 class, bf16 where the CPU multiplies
    it natively): kept once selection grants it the memory (prepare_for_cpu, within the dequantized-cache
    bound), else made for each call by `make`."""

    def __init__(self, make, nbytes: int):
        self.make, self.nbytes, self.kept = make, nbytes, None

    def keep(self) -> None:
        self.kept = self.make()

    def weight(self) -> torch.Tensor:
        kept = self.kept
        return kept if kept is not None else self.make()


def kept(copy: DenseCopy | None):
    """What an optional copy keeps, or None (none, or not kept)."""
    return None if copy is None else copy.kept


def half_copy(make_fp32, elements: int) -> DenseCopy | None:
    """A kernel's weight in float16 for FBGEMM's float16 GEMM (fbgemm_half.py), from `make_fp32` (the weight in
    fp32), as a DenseCopy of `elements` * 2 bytes that selection keeps where it takes every call
    (half_takes_every_call) and the memory bound allows; never made per call. None where torch has no
    FBGEMM."""
    if not fbgemm_half.available():
        return None
    return DenseCopy(lambda: fbgemm_half.FbgemmHalfProducts(make_fp32()), elements * 2)


HALF_GEMV_ENV = "LLMQUANT_CPU_HALF_GEMV"
HALF_GEMM_ENV = "LLMQUANT_CPU_HALF_GEMM"
HALF_CHOICES = ("auto", "on", "off")
# float16 weights cost ~2^-11 of relative precision: taken only where clearly faster
HALF_GEMV_MIN_GAIN = 1.1
HALF_GEMM_ROWS = 64  # the many-row call measured: past decode, a short prompt's size


def half_products(weight: torch.Tensor):
    """rows -> rows @ weight^T with the weight in float16: FBGEMM's float16 GEMM where torch has it (fp32
    rows and sums, any number of rows: fbgemm_half.py), else torch's float16 matmul, which also rounds
    the rows and the output to float16 and is fast only at one row (float16 gemv, fp32 accumulation)."""
    if fbgemm_half.available():
        return fbgemm_half.FbgemmHalfProducts(weight)
    half = weight.to(torch.float16)
    return lambda rows: torch.nn.functional.linear(rows.to(torch.float16), half).float()


def _choice(variable: str) -> str:
    choice = os.environ.get(variable, "auto")
    if choice not in HALF_CHOICES:
        raise ConfigError(f"{variable} must be one of {', '.join(HALF_CHOICES)}, got {choice!r}")
    return choice


@assume_constant_result  # fixed for the process: torch.compile reads it at trace time
def half_gemv_is_faster() -> bool:
    """Whether a one-row product with a float16 weight (half_products) beats the fp32 one here, at the
    current thread count: measured once per thread count, since no CPU flag tells. It reads half the
    bytes, but converts every weight to fp32 on the way: a memory-bound CPU gains up to 2x or more, one
    with bandwidth to spare per core may gain nothing (eval/CPU.md has both). $LLMQUANT_CPU_HALF_GEMV=on /
    off overrides the measurement."""
    choice = _choice(HALF_GEMV_ENV)
    if choice != "auto":
        return choice == "on"
    return half_gains(torch.get_num_threads())[0] >= HALF_GEMV_MIN_GAIN


@assume_constant_result  # fixed for the process: torch.compile reads it at trace time
def half_gemm_is_faster() -> bool:
    """Whether calls of many rows with a float16 weight beat fp32 ones here: only through FBGEMM (torch's
    float16 matmul of many rows is slow on CPUs without native float16), measured once per thread count at
    HALF_GEMM_ROWS rows. $LLMQUANT_CPU_HALF_GEMM=on / off overrides the measurement."""
    if not fbgemm_half.available():
        return False
    choice = _choice(HALF_GEMM_ENV)
    if choice != "auto":
        return choice == "on"
    return half_gains(torch.get_num_threads())[1] >= HALF_GEMV_MIN_GAIN


def half_for(rows: int) -> bool:
    """Whether a call of `rows` rows runs faster with a float16 weight (half_products) than in fp32."""
    return half_gemv_is_faster() if rows == 1 else half_gemm_is_faster()


def half_takes_every_call() -> bool:
    """Whether a kept float16 copy (half_copy) beats fp32 at every call size here, so that it replaces a
    kernel's fp32 copy and its packed op wherever a kernel has one."""
    return half_gemv_is_faster() and half_gemm_is_faster()


@lru_cache
def half_gains(threads: int) -> tuple[float, float]:
    """fp32 time over float16 time (half_products) of a product with a 2048 x 2048 weight (16 MiB in fp32,
    past the caches a decode step's weights live outside of), at one row and at HALF_GEMM_ROWS rows (0.0
    where torch has no fast float16 GEMM); best of interleaved rounds, a fraction of a second once per
    thread count."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
        half = half_products(weight)
        gains = []
        for rows, calls in ((1, 8), (HALF_GEMM_ROWS, 2)):
            if rows > 1 and not fbgemm_half.available():
                gains.append(0.0)
                continue
            x = torch.randn(rows, 2048, generator=torch.Generator().manual_seed(1))
            best = {"fp32": float("inf"), "half": float("inf")}
            products = {"fp32": lambda: torch.nn.functional.linear(x, weight), "half": lambda: half(x)}
            for _ in range(5):
                for kind, product in products.items():
                    product()  # first-call work, caches warmed alike
                    start = time.perf_counter()
                    for _ in range(calls):
                        product()
                    best[kind] = min(best[kind], time.perf_counter() - start)
            gains.append(best["fp32"] / best["half"])
    return gains[0], gains[1]


def packed_compute_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype torch's weight-packed CPU matmuls run fast with."""
    if cpu_capability() in _X86_VECTOR_CAPABILITIES:
        return torch.bfloat16
    return activation_dtype


def describe() -> str:
    return cpu_class().describe()
