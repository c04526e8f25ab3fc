"""Matmul ops of the quantized-linear modules, declared once, with one implementation per backend.

Each op is a torch custom op (`torch.ops.llmquant.<name>`, torch.library) with a fake (shape-only)
implementation, so torch.compile and CUDA graphs treat it as one opaque call. Its CPU and CUDA
kernels are registered for the same op and pick a backend, as bitsandbytes registers per device:
"reference" (torch, any device, differentiable: the functions here) or "triton" (llmquant_kernels,
through triton_ops.py). CUDA tensors get the Triton kernels and CPU tensors the reference, unless
LLMQUANT_KERNELS (or `use_backend`) says "reference" or "triton"; Triton on a CPU needs the
interpreter (TRITON_INTERPRET=1 before triton is imported), as the tests use it. The Triton kernels
have no backward, so a call that needs a gradient through x (QLoRA training) runs the
differentiable reference directly instead of the custom op. Quantized-linear modules call the
functions here, never a kernel.
Under "auto" a quantized linear on the CPU runs the converted fast path of llmquant.inference.cpu before it
reaches these ops; "reference" keeps it on the reference here.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..storage import bitpack
from ..errors import ConfigError
from ..grid.activations import quantize_per_tensor, quantize_per_token
from ..grid.codebook import dequantize_nested_absmax, scale_blocks
from ..rotation.hadamard import sylvester

REFERENCE = "reference"
TRITON = "triton"
BACKENDS = ("auto", REFERENCE, TRITON)
_REFERENCES: dict[str, Callable] = {}
_override: list[str] = []


def reference(op: str):
    def decorate(fn):
        _REFERENCES[op] = fn
        return fn

    return decorate


@contextlib.contextmanager
def use_backend(backend: str):
    """Within the block, run the quantized ops on `backend` ("auto", "reference" or "triton")."""
    if backend not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _override.append(backend)
    try:
        yield
    finally:
        _override.pop()


def requested_backend() -> str:
    """The backend asked for: the innermost `use_backend` block, else LLMQUANT_KERNELS, else "auto"."""
    wanted = _override[-1] if _override else os.environ.get("LLMQUANT_KERNELS", "auto")
    if wanted not in BACKENDS:
        raise ConfigError(f"LLMQUANT_KERNELS must be one of {', '.join(BACKENDS)}, got {wanted!r}")
    return wanted


def backend_for(device_type: str) -> str:
    wanted = requested_backend()
    if wanted == "auto":
        return TRITON if device_type == "cuda" else REFERENCE
    if wanted == TRITON and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("the Triton kernels run on the CPU only under the interpreter: set TRITON_INTERPRET=1 "
                          "before triton is imported")
    return wanted


def implementation(op: str, device_type: str) -> Callable:
    """The implementation of `op` for tensors on `device_type`: the backend chosen for that device."""
    if backend_for(device_type) == TRITON:
        return getattr(importlib.import_module(".triton_ops", __package__), op)
    return _REFERENCES[op]


def _run(name: str, x: torch.Tensor, *args) -> torch.Tensor:
    """Op `name` on (x, *args): the custom op, or its differentiable reference when a gradient
    through x is wanted."""
    backend_for(x.device.type)  # a bad LLMQUANT_KERNELS is refused on every path
    if torch.is_grad_enabled() and x.requires_grad:
        return _REFERENCES[name](x, *args)
    return getattr(torch.ops.llmquant, name)(x, *args)


def _declare(name: str, output_features: Callable | None) -> Callable:
    """torch.ops.llmquant.<name>, with the argument types of its reference implementation: its CPU and
    CUDA kernels run the backend chosen for the device, its fake implementation gives an output of
    x's dtype and shape [..., output_features(*other arguments)] (x's shape when None)."""
    def run(x, *args):
        return implementation(name, x.device.type)(x, *args)

    op = torch.library.custom_op(f"llmquant::{name}", run, mutates_args=(), device_types=("cpu", "cuda"),
                                 schema=torch.library.infer_schema(_REFERENCES[name], mutates_args=()))
    if output_features is None:
        op.register_fake(lambda x, *args: torch.empty_like(x))
    else:
        op.register_fake(lambda x, *args: x.new_empty(*x.shape[:-1], output_features(*args)))
    return op


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int, dtype=torch.float32):
    """[out, in] weight from GPTQ-layout tensors (see llmquant.formats.gptq)."""
    codes = bitpack.unpack(qweight, bits, dim=0)
    zeros = bitpack.unpack(qzeros, bits, dim=1) + zero_offset
    g = g_idx.long()
    # fp32 holds (code - zero) * fp16 scale exactly; cast once at the end.
    weight = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return weight.t().to(dtype)


def gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits: int, zero_offset: int):
    return _run("gptq_linear", x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset)


@reference("gptq_linear")
def _gptq_linear_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                           g_idx: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                           zero_offset: int) -> torch.Tensor:
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# AWQ GEMM packs 8 nibbles per int32 along the output dim, nibble k holding column
# 8 * word + AWQ_PACK_ORDER[k] (the order its CUDA kernel dequantizes in).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_interleave(columns: int, device=None) -> torch.Tensor:
    """Column permutation p with packed position j holding logical column p[j]."""
    order = torch.tensor(AWQ_PACK_ORDER, device=device)
    return (torch.arange(columns // 8, device=device)[:, None] * 8 + order[None, :]).reshape(-1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, columns / 8] in the AWQ order -> int32 values [rows, columns]."""
    interleaved = bitpack.unpack(packed, 4, dim=1)
    return interleaved[:, torch.argsort(awq_interleave(interleaved.shape[1], packed.device))]


def dequantize_awq(qweight, qzeros, scales, group_size: int, dtype=torch.float32):
    """[out, in] weight from AWQ GEMM tensors (see llmquant.formats.awq)."""
    codes = unpack_awq(qweight)  # [in, out]
    zeros = unpack_awq(qzeros)  # [groups, out]
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    weight = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return weight.t().to(dtype)


def awq_linear(x, qweight, qzeros, scales, bias, group_size: int):
    return _run("awq_linear", x, qweight, qzeros, scales, bias, group_size)


@reference("awq_linear")
def _awq_linear_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    weight = dequantize_awq(qweight, qzeros, scales, group_size, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def w8a8_linear(x, weight, weight_scale, input_scale, bias):
    """int8 x int8 -> int32 matmul with the scale epilogue; x quantized per token (dynamic) when
    input_scale is None, else with the static per-tensor input_scale."""
    return _run("w8a8_linear", x, weight, weight_scale, input_scale, bias)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = a int8 [M, K] @ b_t int8 [N, K]^T, exact integer accumulation. On a CPU without an
    int8 dot product (the class llmquant.inference.cpu.capability plans for) not through `torch._int_mm`: oneDNN's
    int8 GEMM below AVX512_CORE_VNNI saturates its 16-bit pair sums (ONEDNN_MAX_CPU_ISA=AVX2 or
    AVX512_CORE on torch 2.13; the error measured: eval/CPU.md, "W8A8 without an int8 dot product"), so
    there the products are summed in float64, exact for any K below 2^39."""
    if a.device.type == "cpu":
        from .cpu.capability import has_int8_dot_product

        if not has_int8_dot_product():
            return torch.mm(a.double(), b_t.double().t()).to(torch.int32)
    return torch._int_mm(a.contiguous(), b_t.t().contiguous())


@reference("w8a8_linear")
def _w8a8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           input_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        codes, x_scale = quantize_per_token(rows)
    else:
        codes, x_scale = quantize_per_tensor(rows, input_scale), input_scale.float().reshape(1, 1)
    accumulated = int8_matmul(codes, weight)
    out = accumulated.to(torch.float32) * x_scale * weight_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def dequantize_4bit(packed, absmax, table, blocksize: int, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [out, in] weight from bitsandbytes 4-bit tensors (see llmquant.formats.bitsandbytes);
    absmax is the fp32 per-block scale (already dequantized under double quantization)."""
    count = shape[0] * shape[1]
    # one lookup per byte: byte b holds (table[b >> 4], table[b & 15])
    table = table.float()
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)
    values = F.embedding(packed.reshape(-1).long(), pairs).reshape(-1)[:count]
    return scale_blocks(values, absmax, blocksize).view(shape)


def codebook4_linear(x, packed, absmax, table, nested, blocksize: int, shape: tuple[int, int], bias):
    """x @ W^T for an NF4 / FP4 weight. nested: (nested_absmax, nested_table, offset, nested_blocksize)
    when absmax is double-quantized (uint8), else None."""
    nested_absmax, nested_table, offset, nested_blocksize = nested if nested is not None else (None, None, 0.0, 0)
    return _run("codebook4_linear", x, packed, absmax, table, nested_absmax, nested_table, float(offset),
                int(nested_blocksize), blocksize, list(shape), bias)


@reference("codebook4_linear")
def _codebook4_linear_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                                nested_absmax: Optional[torch.Tensor], nested_table: Optional[torch.Tensor],
                                nested_offset: float, nested_blocksize: int, blocksize: int, shape: list[int],
                                bias: Optional[torch.Tensor]) -> torch.Tensor:
    if nested_absmax is not None:
        absmax = dequantize_nested_absmax(absmax, nested_absmax, nested_table, nested_offset, nested_blocksize)
    weight = dequantize_4bit(packed, absmax, table, blocksize, shape).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def hadamard_transform(x: torch.Tensor, small: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """x [..., n] @ (small ⊗ H_P) * scale over the last dim: H_P Sylvester's Hadamard matrix of the
    power of two P = n / m, small an m x m matrix (hadamard.hadamard_factors; None when n is a power of
    two). O(n log n) instead of the dense product's n^2; computed in fp32, returned in x's dtype."""
    n = x.shape[-1]
    m = 1 if small is None else small.shape[0]
    if n % m or (n // m) & (n // m - 1) or (small is not None and small.shape != (m, m)):
        raise ValueError(f"hadamard_transform: the last dim {n} is not a power of two times the small matrix's "
                         f"order {m}")
    return _run("hadamard_transform", x, small, float(scale))


# The CPU path multiplies by H_P as a Kronecker product of Sylvester blocks of up to this order, one
# matmul per block over its axis of the row: log_128(P) passes over memory instead of the log_2(P)
# elementwise ones of radix-2 butterflies (8192 x 512 rows, one thread: 50 ms against 300 ms, the dense
# product 1.4 s; eval/bench_hadamard.py).
HADAMARD_RADIX = 128


@reference("hadamard_transform")
def _hadamard_transform_reference(x: torch.Tensor, small: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    n = x.shape[-1]
    power = n // (1 if small is None else small.shape[0])
    blocks = []
    while power > 1:  # H_P = H_k1 ⊗ H_k2 ⊗ ... (Sylvester's matrices are Kronecker powers of H_2)
        blocks.append(min(power, HADAMARD_RADIX))
        power //= blocks[-1]
    factors = ([small.to(device=x.device, dtype=torch.float32)] if small is not None else []) + \
        [sylvester_hadamard(k, x.device) for k in blocks]
    y = x.float().reshape(-1, n)
    after = n
    for factor in factors:  # x @ (F1 ⊗ F2 ⊗ ...): each factor mixes its own axis of the row, [.., k, after]
        k = factor.shape[0]
        after //= k
        y = y.reshape(-1, k) @ factor if after == 1 else torch.matmul(factor.t(), y.reshape(-1, k, after))
    return (y.reshape(x.shape) * scale).to(x.dtype)


@functools.lru_cache(maxsize=None)
def sylvester_hadamard(k: int, device: torch.device) -> torch.Tensor:
    return sylvester(k).to(device=device, dtype=torch.float32)


CUSTOM_OPS = {
    "gptq_linear": _declare("gptq_linear", lambda qweight, qzeros, scales, *rest: scales.shape[1]),
    "awq_linear": _declare("awq_linear", lambda qweight, qzeros, scales, *rest: scales.shape[1]),
    "w8a8_linear": _declare("w8a8_linear", lambda weight, *rest: weight.shape[0]),
    "codebook4_linear": _declare("codebook4_linear", lambda packed, absmax, table, *rest: rest[-2][0]),
    "hadamard_transform": _declare("hadamard_transform", None),
}
