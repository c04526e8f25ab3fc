"""Per-channel affine weights of up to 8 bits through torch's int8 weight-packed CPU matmul.

`_weight_int8pack_mm(x, w8, s)` computes x @ (w8 * s)^T with int8 w8 [out, in] and one scale per
output channel. A b-bit code q with zero point z is stored as w8 = q - 2^(b-1) (in int8 for b <= 8),
and (q - z) * s = w8 * s + (2^(b-1) - z) * s: symmetric grids have z = 2^(b-1) and need nothing
more; asymmetric ones add sum_i(x_i) * (2^(b-1) - z) * s per output. Grouped weights (several
scales per row) are not what the op takes; per channel, the order of input columns does not matter,
so act-order needs no permutation here. Calls of many rows run as a dense bfloat16 matmul of the int8
codes (exact in bf16) where the CPU has a fast one, the scales applied after. The op's own scale
would be in the activations' dtype (bf16 on x86), off by up to 2^-9 for a whole output channel, so it
gets ones and the fp32 scales multiply its output. Without native bf16 (the AVX2 class) calls of many
rows (capability.dense_fp32_for) run a dense fp32 matmul of the int8 codes (exact in fp32) instead, the
codes in fp32 kept when prepare_for_cpu grants the memory, else converted per call; where FBGEMM's float16
GEMM beats fp32 at every call size (capability.half_takes_every_call), the codes in float16 (exact) packed
by FBGEMM take every call instead (fbgemm_half.py), with the same numerics as the fp32 codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .affine import affine_weight, stacked, stacking_refusal
from .capability import DenseCopy, dense_bf16_for, dense_fp32_for, half_copy, half_for, kept, has_fast_bf16_matmul, packed_compute_dtype
from .fused import stacked_bias

NAME = "int8pack"
ACCEPTS = "GPTQ / AWQ affine weights of 2-8 bits with one scale per output channel (group_size -1)"


def refusal(module) -> str | None:
    weight = affine_weight(module)
    if weight is None:
        return "not an affine (GPTQ / AWQ) weight"
    if not weight.per_channel:
        return f"{weight.scales.shape[0]} groups per row, the op takes one scale per output channel"
    return None


def fusion_refusal(modules) -> str | None:
    return stacking_refusal([affine_weight(m) for m in modules])


class Int8PackKernel:
    """`modules`: one linear, or several reading one input (fusion_refusal None), output channels end to end."""

    def __init__(self, modules, activation_dtype: torch.dtype):
        weight = stacked([affine_weight(m) for m in modules])
        codes, zeros = weight.unpack()
        center = 2 ** (weight.bits - 1)
        self.compute_dtype = packed_compute_dtype(activation_dtype)
        self.weight = (codes.t() - center).to(torch.int8).contiguous()
        scales = weight.scales[0].float()
        self.float_scales = scales
        self.unit_scales = torch.ones_like(scales, dtype=self.compute_dtype)
        offset = (center - zeros[0]).float() * scales
        self.row_sum_scale = offset if bool((offset != 0).any()) else None
        self.bias = stacked_bias(modules, activation_dtype)
        self.out_features = weight.out_features
        self.dense_fp32 = DenseCopy(lambda: self.weight.float(), self.weight.numel() * 4)
        self.dense_half = None if has_fast_bf16_matmul() else half_copy(lambda: self.weight.float(), self.weight.numel())
        self.detail = (("asymmetric (row-sum correction), " if self.row_sum_scale is not None else "")
                       + f"{str(self.compute_dtype).removeprefix('torch.')} activations")

    @property
    def nbytes(self) -> int:
        extra = [self.weight, self.unit_scales, self.float_scales] + ([self.row_sum_scale] if self.row_sum_scale is not None else [])
        if self.dense_fp32.kept is not None:
            extra.append(self.dense_fp32.kept)
        half = kept(self.dense_half)
        return sum(t.numel() * t.element_size() for t in extra) + (half.nbytes if half is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        half = kept(self.dense_half)
        if half is not None and half_for(rows.shape[0]):
            products = half(rows.float())
        elif dense_fp32_for(rows.shape[0], self.dense_fp32.kept is not None):
            products = F.linear(rows.float(), self.dense_fp32.weight())
        elif dense_bf16_for(rows.shape[0]):
            products = F.linear(rows.to(torch.bfloat16), self.weight.to(torch.bfloat16))
        else:
            products = torch.ops.aten._weight_int8pack_mm(rows.to(self.compute_dtype).contiguous(), self.weight,
                                                          self.unit_scales)
        out = products.float().mul_(self.float_scales)
        if self.row_sum_scale is not None:
            out = out.addmm_(rows.float().sum(dim=1, keepdim=True), self.row_sum_scale[None])
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)


build = Int8PackKernel
