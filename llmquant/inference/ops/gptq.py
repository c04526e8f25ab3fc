"""gptq_linear: x @ W^T for GPTQ-packed weights (llmquant.formats.gptq's layout; pack-quantized
checkpoints run it too, from the same bits read as GPTQ's).

Numerics: W = (code - (zero + zero_offset)) * scale per input row's group (g_idx), computed in fp32
(exact for fp16 scales) and cast once to x's dtype; then x @ W^T (+ bias) in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...storage import bitpack
from .registry import call, declare


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int, dtype=torch.float32):
    """[out, in] weight from GPTQ-layout tensors (see llmquant.formats.gptq)."""
    codes = bitpack.unpack(qweight, bits, dim=0)
    zeros = bitpack.unpack(qzeros, bits, dim=1) + zero_offset
    g = g_idx.long()
    # fp32 holds (code - zero) * fp16 scale exactly; cast once at the end.
    weight = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return weight.t().to(dtype)


def gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits: int, zero_offset: int):
    return call("gptq_linear", x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset)


@declare("gptq_linear", output_features=lambda qweight, qzeros, scales, *rest: scales.shape[1])
def gptq_linear_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          g_idx: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                          zero_offset: int) -> torch.Tensor:
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
