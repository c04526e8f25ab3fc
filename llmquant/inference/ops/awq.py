"""awq_linear: x @ W^T for AWQ GEMM-packed 4-bit weights (llmquant.formats.awq's layout).

Numerics: W = (code - zero) * scale per run of group_size input rows, computed in fp32 and cast
once to x's dtype; then x @ W^T (+ bias) in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...storage import bitpack
from .registry import call, declare

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
    return call("awq_linear", x, qweight, qzeros, scales, bias, group_size)


@declare("awq_linear", output_features=lambda qweight, qzeros, scales, *rest: scales.shape[1])
def awq_linear_reference(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                         bias: Optional[torch.Tensor], group_size: int) -> torch.Tensor:
    weight = dequantize_awq(qweight, qzeros, scales, group_size, dtype=x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
