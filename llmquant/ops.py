"""Matmul ops of the quantized-linear modules, one implementation per device type.

An op is declared once (a function here that dispatches); implementations register per device
type, as bitsandbytes does. The torch reference serves any device that has nothing faster.
Quantized-linear modules call these ops, never a kernel directly.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import bitpack

REFERENCE = "reference"
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}


def register(op: str, device_type: str):
    def decorate(fn):
        _IMPLEMENTATIONS[(op, device_type)] = fn
        return fn

    return decorate


def implementation(op: str, device_type: str) -> Callable:
    impl = _IMPLEMENTATIONS.get((op, device_type)) or _IMPLEMENTATIONS.get((op, REFERENCE))
    if impl is None:
        raise NotImplementedError(f"no implementation of {op} for device {device_type}")
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
    return implementation("gptq_linear", x.device.type)(
        x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset
    )


@register("gptq_linear", REFERENCE)
def _gptq_linear_reference(x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset):
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
