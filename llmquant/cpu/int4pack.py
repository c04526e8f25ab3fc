"""4-bit (and 2- / 3-bit) affine weights through torch's int4 weight-packed CPU matmul.

`_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)` computes x @ W^T with
W = (q - 8) * s + zero per run of `group` input columns. A code q with zero point z gives
(q - z) * s = (q - 8) * s + (8 - z) * s, so zero = (8 - z) * s, and 2- and 3-bit codes are 4-bit
codes as they are. The op wants runs of 32 / 64 / 128 / 256 columns sharing one scale: a checkpoint
group of 128 on 576 columns (a partial last group) runs as 64-column runs with repeated scales, a
per-channel weight as runs of the largest size dividing in_features, and act-order (g_idx not
sorted) by permuting the input columns of x and W so each group's columns are contiguous.
"""
from __future__ import annotations

import torch

from .affine import affine_weight
from .capability import packed_compute_dtype

NAME = "int4pack"
ACCEPTS = ("GPTQ / AWQ affine weights of 2-4 bits; out_features % 16 == 0; input columns, after sorting "
           "by group, in runs of 32/64/128/256 that share a scale (any group size that is a multiple of 32 "
           "and divides in_features after the partial last group, per channel, act-order)")
RUN_SIZES = (32, 64, 128, 256)
OUT_MULTIPLE = 16


def refusal(module) -> str | None:
    weight = affine_weight(module)
    if weight is None:
        return "not an affine (GPTQ / AWQ) weight"
    if weight.bits > 4:
        return f"{weight.bits}-bit codes do not fit 4 bits"
    if weight.out_features % OUT_MULTIPLE:
        return f"out_features {weight.out_features} is not a multiple of {OUT_MULTIPLE}"
    if weight.contiguous_group(RUN_SIZES, weight.column_order()) is None:
        return (f"no run of {'/'.join(map(str, RUN_SIZES))} columns divides in_features {weight.in_features} "
                "within the groups")
    return None


class Int4PackKernel:
    def __init__(self, module, activation_dtype: torch.dtype):
        weight = affine_weight(module)
        order = weight.column_order()
        run = weight.contiguous_group(RUN_SIZES, order)
        codes, zeros = weight.unpack()
        groups = weight.group_of_column
        if order is not None:
            codes, groups = codes[order], groups[order]
        self.compute_dtype = packed_compute_dtype(activation_dtype)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
        group_of_run = groups[::run]
        scales = weight.scales[group_of_run].float()
        shift = (8 - zeros[group_of_run]).float() * scales
        self.scales_and_zeros = torch.stack([scales, shift], dim=-1).to(self.compute_dtype).contiguous()
        self.run = run
        self.column_order = order
        self.bias = module.bias
        self.out_features = weight.out_features
        self.detail = (f"runs of {run}" + (", act-order columns permuted" if order is not None else "")
                       + f", {str(self.compute_dtype).removeprefix('torch.')} activations")

    @property
    def nbytes(self) -> int:
        extra = [self.packed, self.scales_and_zeros] + ([self.column_order] if self.column_order is not None else [])
        return sum(t.numel() * t.element_size() for t in extra)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.column_order is not None:
            rows = rows.index_select(1, self.column_order)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(self.compute_dtype).contiguous(), self.packed,
                                                         self.run, self.scales_and_zeros).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


build = Int4PackKernel
