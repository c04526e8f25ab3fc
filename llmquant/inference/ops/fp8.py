"""The FP8 ops.

- fp8_linear: W8A8-FP8. Numerics: x rounded to e4m3 per token (dynamic), the weight holds e4m3 codes
  with one scale per output channel; y = (x_codes @ w_codes^T) * x_scale * w_scale (+ bias). The
  reference emulates it: exact products of e4m3 values accumulated in fp32, then the scales. On a
  GPU it is torch._scaled_mm with row-wise scales (cuBLASLt FP8, compute capability 8.9+).
- fp8_block_linear: FP8 weight-only, one scale per block x block weights; x stays as it is.
  Numerics: the weight dequantized in x's dtype, then x @ W^T. The GPU runs a Triton kernel that
  dequantizes tiles in registers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...grid.fp8 import dequantize_fp8, quantize_rows_fp8
from .registry import call, declare


def fp8_linear(x, weight, weight_scale, bias):
    return call("fp8_linear", x, weight, weight_scale, bias)


@declare("fp8_linear", output_features=lambda weight, *rest: weight.shape[0])
def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    codes, x_scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
    accumulated = codes.to(torch.float32) @ weight.to(torch.float32).t()
    out = accumulated * x_scale * weight_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_block_linear(x, weight, weight_scale, bias, block: int):
    return call("fp8_block_linear", x, weight, weight_scale, bias, block)


@declare("fp8_block_linear", output_features=lambda weight, *rest: weight.shape[0])
def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               bias: Optional[torch.Tensor], block: int) -> torch.Tensor:
    w = dequantize_fp8(weight, weight_scale, block, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
