"""w8a8_linear: int8 weights times int8 activations (SmoothQuant's W8A8).

Numerics: x is rounded to int8 per token (dynamic: scale = absmax / 127 of each row) or with the
static per-tensor input_scale; the int8 products are accumulated exactly in int32; the result is
scaled by x's scale times the weight's per-output-channel scale in fp32 (+ bias), then cast to x's
dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...grid.activations import quantize_per_tensor, quantize_per_token
from .registry import call, declare


def w8a8_linear(x, weight, weight_scale, input_scale, bias):
    """int8 x int8 -> int32 matmul with the scale epilogue; x quantized per token (dynamic) when
    input_scale is None, else with the static per-tensor input_scale."""
    return call("w8a8_linear", x, weight, weight_scale, input_scale, bias)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = a int8 [M, K] @ b_t int8 [N, K]^T, exact integer accumulation. On a CPU without an
    int8 dot product (the class llmquant.inference.cpu.capability plans for) not through `torch._int_mm`: oneDNN's
    int8 GEMM below AVX512_CORE_VNNI saturates its 16-bit pair sums (ONEDNN_MAX_CPU_ISA=AVX2 or
    AVX512_CORE on torch 2.13; the error measured: eval/CPU.md, "W8A8 without an int8 dot product"), so
    there the products are summed in float64, exact for any K below 2^39."""
    if a.device.type == "cpu":
        from ..cpu.capability import has_int8_dot_product

        if not has_int8_dot_product():
            return torch.mm(a.double(), b_t.double().t()).to(torch.int32)
    return torch._int_mm(a.contiguous(), b_t.t().contiguous())


@declare("w8a8_linear", output_features=lambda weight, *rest: weight.shape[0])
def w8a8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
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
