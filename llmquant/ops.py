"""Matmul ops of the quantized-linear modules, one implementation per backend.

An op is declared once (a function here that dispatches); implementations register per backend,
as bitsandbytes registers per device: "reference" (torch, any device, differentiable) here, and
"triton" (llmquant_kernels) in triton_ops.py. CUDA tensors get the Triton kernels, CPU tensors the
reference, unless LLMQUANT_KERNELS (or `use_backend`) says "reference" or "triton"; Triton on a
CPU needs the interpreter (TRITON_INTERPRET=1 before triton is imported), as the tests use it.
Under "auto" a quantized linear on the CPU runs the converted fast path of llmquant.cpu before it
reaches these ops; "reference" keeps it on the reference here.
Quantized-linear modules call these ops, never a kernel directly.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Callable

import torch
import torch.nn.functional as F

from . import bitpack
from .grid.codebook import dequantize_nested_absmax, scale_blocks
from .errors import ConfigError

REFERENCE = "reference"
TRITON = "triton"
BACKENDS = ("auto", REFERENCE, TRITON)
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
_override: list[str] = []


def register(op: str, backend: str):
    def decorate(fn):
        _IMPLEMENTATIONS[(op, backend)] = fn
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


def implementation(op: str, x: torch.Tensor) -> Callable:
    """The implementation of `op` for input x: its device's backend, except that the Triton kernels
    have no backward, so a call that needs a gradient through x (QLoRA training) gets the
    differentiable reference."""
    backend = backend_for(x.device.type)
    if backend == TRITON and torch.is_grad_enabled() and x.requires_grad:
        backend = REFERENCE
    if backend == TRITON:
        importlib.import_module(".triton_ops", __package__)  # registers the Triton implementations
    impl = _IMPLEMENTATIONS.get((op, backend)) or _IMPLEMENTATIONS.get((op, REFERENCE))
    if impl is None:
        raise NotImplementedError(f"no implementation of {op} for backend {backend}")
    return impl


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int, dtype=torch.float32):
    """[out, in] weight from GPTQ-layout tensors (see llmquant.formats.gptq)."""
    codes = bitpack.unpack(qweight, bits, dim=0)
    zeros = bitpack.unpack(qzeros, bits, dim=1) + zero_offset
    g = g_idx.long()
    # fp32 holds (code - zero) * fp16 scale exactly; cast once at the end.
    weight = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return weight.t().to(dtype)


def gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits: int, zero_offset: int):
    return implementation("gptq_linear", x)(
        x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset
    )


@register("gptq_linear", REFERENCE)
def _gptq_linear_reference(x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset):
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# AWQ GEMM packs 8 nibbles per int32 along the output dim, nibble k holding column
# 8 * word + AWQ_PACK_ORDER[k] (the order its CUDA kernel dequantizes in).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_interleave(columns: int) -> torch.Tensor:
    """Column permutation p with packed position j holding logical column p[j]."""
    order = torch.tensor(AWQ_PACK_ORDER)
    return (torch.arange(columns // 8)[:, None] * 8 + order[None, :]).reshape(-1)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, columns / 8] in the AWQ order -> int32 values [rows, columns]."""
    interleaved = bitpack.unpack(packed, 4, dim=1)
    return interleaved[:, torch.argsort(awq_interleave(interleaved.shape[1]))]


def dequantize_awq(qweight, qzeros, scales, group_size: int, dtype=torch.float32):
    """[out, in] weight from AWQ GEMM tensors (see llmquant.formats.awq)."""
    codes = unpack_awq(qweight)  # [in, out]
    zeros = unpack_awq(qzeros)  # [groups, out]
    g = torch.arange(codes.shape[0], device=codes.device) // group_size
    weight = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return weight.t().to(dtype)


def awq_linear(x, qweight, qzeros, scales, bias, group_size: int):
    return implementation("awq_linear", x)(x, qweight, qzeros, scales, bias, group_size)


@register("awq_linear", REFERENCE)
def _awq_linear_reference(x, qweight, qzeros, scales, bias, group_size):
    weight = dequantize_awq(qweight, qzeros, scales, group_size, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def w8a8_linear(x, weight, weight_scale, input_scale, bias):
    """int8 x int8 -> int32 matmul with the scale epilogue; x quantized per token (dynamic) when
    input_scale is None, else with the static per-tensor input_scale."""
    return implementation("w8a8_linear", x)(x, weight, weight_scale, input_scale, bias)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = a int8 [M, K] @ b_t int8 [N, K]^T, exact integer accumulation."""
    return torch._int_mm(a.contiguous(), b_t.t().contiguous())


@register("w8a8_linear", REFERENCE)
def _w8a8_linear_reference(x, weight, weight_scale, input_scale, bias):
    from .grid.activations import quantize_per_tensor, quantize_per_token

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
    return implementation("codebook4_linear", x)(x, packed, absmax, table, nested, blocksize, shape, bias)


@register("codebook4_linear", REFERENCE)
def _codebook4_linear_reference(x, packed, absmax, table, nested, blocksize, shape, bias):
    if nested is not None:
        absmax = dequantize_nested_absmax(absmax, *nested)
    weight = dequantize_4bit(packed, absmax, table, blocksize, shape).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
