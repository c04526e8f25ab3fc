"""What this CPU runs fast, asked of torch once.

On x86 torch's int4 / int8 weight-packed matmuls are vectorized (AVX2 / AVX-512 tinygemm) only for
bfloat16 activations; float32 and float16 inputs take a scalar loop that is slower than an fp32
matmul. So the packed paths compute in bfloat16 there and in the activations' own dtype elsewhere
(aarch64 builds vectorize float32 too). An int8 x int8 -> int32 matmul (`torch._int_mm`) is fast
only where the CPU has an int8 dot-product instruction (VNNI, AMX); without one it is about 30x
slower than an fp32 matmul. Where the CPU multiplies bfloat16 natively (AVX-512 BF16, AMX), a dense
bf16 matmul (oneDNN) of many rows is 2-4x faster than fp32 while the packed ops, which dequantize
inside for every few rows, are no faster than fp32 there: from DENSE_FROM_ROWS rows on, the paths
dequantize the weight into bfloat16 for the call instead (measured on a 2-core AVX-512 CPU: at 64
rows the packed op still wins, at 512 the dense one by 2-4x).
"""
from __future__ import annotations

from functools import lru_cache

import torch

_X86_VECTOR_CAPABILITIES = ("AVX2", "AVX512")
DENSE_FROM_ROWS = 128


@lru_cache
def cpu_capability() -> str:
    """torch's name for the vector extension its CPU kernels were dispatched to ("AVX512", "AVX2", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private probes; absent from some builds
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@lru_cache
def has_int8_dot_product() -> bool:
    """Whether int8 GEMMs run on a dot-product instruction (AVX-512 VNNI / AVX-VNNI / AMX)."""
    return _cpu_flag("_is_vnni_supported") or _cpu_flag("_is_amx_tile_supported")


@lru_cache
def has_fast_bf16_matmul() -> bool:
    return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")


def dense_bf16_for(rows: int) -> bool:
    """Whether a call with this many rows runs faster as a dense bfloat16 matmul."""
    return rows >= DENSE_FROM_ROWS and has_fast_bf16_matmul()


def packed_compute_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype torch's weight-packed CPU matmuls run fast with."""
    if cpu_capability() in _X86_VECTOR_CAPABILITIES:
        return torch.bfloat16
    return activation_dtype


def describe() -> str:
    flags = [name for name, on in (("int8-dot", has_int8_dot_product()),
                                   ("avx512-bf16", _cpu_flag("_is_avx512_bf16_supported"))) if on]
    return f"{cpu_capability()}" + (f" ({', '.join(flags)})" if flags else "")
