"""4-bit (and 2- / 3-bit) affine weights through torch's int4 weight-packed CPU matmul.

`_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)` computes x @ W^T with
W = (q - 8) * s + zero per run of `group` input columns. A code q with zero point z gives
(q - z) * s = (q - 8) * s + (8 - z) * s, and 2- and 3-bit codes are 4-bit codes as they are. The op
holds s and zero in the activations' dtype (bf16 on x86), and a bf16 zero (8 - z) * s is off by up
to 7 * 2^-9 * s for the whole run, an error that adds up over the run's inputs instead of averaging
out (it shows in the perplexity of asymmetric SmolLM2 checkpoints); so the op gets zero 0 and the
term (8 - z) * s is added in fp32 as (sum of x over each run) @ shifts, K / run times fewer
multiply-adds than the matmul. The op wants runs of 32 / 64 / 128 / 256 columns sharing one scale: a checkpoint
group of 128 on 576 columns (a partial last group) runs as 64-column runs with repeated scales, a
per-channel weight as runs of the largest size dividing in_features, and act-order (g_idx not
sorted) by permuting the input columns of x and W so each group's columns are contiguous.

Calls of many rows (prefill) run faster as a dense bfloat16 matmul where the CPU has one
(capability.dense_bf16_for), of the weight dequantized from the packed bytes, whose layout (torch's,
per ISA) is checked against the codes once at conversion (if it is not the one expected, every call
stays on the packed op). The bf16 weight is kept when prepare_for_cpu grants the memory (the
dequantized-cache bound), else made per call: dequantizing a 1B model's weights for every 128-token
call cost more than the matmuls (eval/CPU.md). Without native bf16 (the AVX2 class) calls of
DENSE_FP32_FROM_ROWS rows or more (capability.dense_fp32_for) run a dense fp32 matmul of the weight
dequantized in fp32 from the same bytes (the reference's numerics, to fp32 rounding): the packed op
computes in emulated bf16 there and is slower than fp32 from a few rows on (eval/CPU.md, "Per call
size"). The fp32 weight is kept when prepare_for_cpu grants the memory (the dequantized-cache bound),
else made per call; a kept weight takes calls of fewer rows (capability's thresholds). Where torch has
FBGEMM and its float16 GEMM beats fp32 at one row and at many (capability.half_takes_every_call, measured),
both give way to the weight rounded to float16 once (one rounding of the fp32 dequantization, ~2^-11
relative: finer than the packed op's bf16) and kept packed by FBGEMM (fbgemm_half.py) for every call:
half the memory of the fp32 copy, and faster at every size where measured (eval/CPU.md, "float16 weights
through FBGEMM").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .affine import affine_weight, stacked, stacking_refusal
from .capability import DenseCopy, dense_bf16_for, dense_fp32_for, half_copy, half_for, kept, has_fast_bf16_matmul, packed_compute_dtype
from .fused import stacked_bias

NAME = "int4pack"
ACCEPTS = ("GPTQ / AWQ affine weights of 2-4 bits; out_features % 16 == 0; input columns, after sorting "
           "by group, in runs of 32/64/128/256 that share a scale (any group size that is a multiple of 32 "
           "and divides in_features after the partial last group, per channel, act-order)")
RUN_SIZES = (32, 64, 128, 256)
OUT_MULTIPLE = 16
LAYOUT_BLOCKS = (64, 32)  # output columns per block of torch's packed layout: AVX-512, AVX2


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


def fusion_refusal(modules) -> str | None:
    return stacking_refusal([affine_weight(m) for m in modules])


def unpack_packed(packed: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    """uint8 codes [out, in] from torch's CPU int4 layout: [out / block, in, block / 2] bytes, byte j of a
    row holding column j of its block in the low nibble and column j + block / 2 in the high one."""
    rows = packed.view(out_features // block, in_features, block // 2)
    codes = torch.empty(out_features // block, 2, block // 2, in_features, dtype=torch.uint8)
    codes[:, 0].copy_((rows & 15).transpose(1, 2))
    codes[:, 1].copy_((rows >> 4).transpose(1, 2))
    return codes.view(out_features, in_features)


def _layout_block(packed: torch.Tensor, codes: torch.Tensor) -> int | None:
    out_features, in_features = codes.shape
    for block in LAYOUT_BLOCKS:
        if out_features % block == 0 and packed.numel() * 2 == codes.numel() \
                and torch.equal(unpack_packed(packed, out_features, in_features, block), codes.to(torch.uint8)):
            return block
    return None


class Int4PackKernel:
    """`modules`: one linear, or several reading one input (fusion_refusal None), output channels end to end."""

    def __init__(self, modules, activation_dtype: torch.dtype):
        weight = stacked([affine_weight(m) for m in modules])
        order = weight.column_order()
        run = weight.contiguous_group(RUN_SIZES, order)
        codes, zeros = weight.unpack()
        groups = weight.group_of_column
        if order is not None:
            codes, groups = codes[order], groups[order]
        self.compute_dtype = packed_compute_dtype(activation_dtype)
        codes = codes.t().contiguous()
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        group_of_run = groups[::run]
        scales = weight.scales[group_of_run].float()
        shift = (8 - zeros[group_of_run]).float() * scales
        self.scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1).to(self.compute_dtype)
        self.run_shifts = shift.contiguous() if bool((shift != 0).any()) else None  # [runs, out] fp32
        self.layout_block = _layout_block(self.packed, codes)
        # [out, runs, 1] fp32, for dequantizing the packed weight in dense calls: W = q * s + (shift - 8 s)
        self.dense_scales, self.dense_shifts = (t.t().contiguous()[:, :, None] for t in (scales, shift - 8 * scales))
        self.run = run
        self.column_order = order
        self.bias = stacked_bias(modules, activation_dtype)
        self.out_features = weight.out_features
        size = weight.out_features * weight.in_features
        self.dense_fp32, self.dense_bf16 = ((DenseCopy(lambda: self.dense_weight(torch.float32), size * 4),
                                             DenseCopy(lambda: self.dense_weight(torch.bfloat16), size * 2))
                                            if self.layout_block is not None else (None, None))
        # without native bf16 the packed op runs in emulated bf16: a float16 copy through FBGEMM, where it
        # takes every call, replaces it and the fp32 copy (module docstring)
        self.dense_half = (half_copy(lambda: self.dense_weight(torch.float32), size)
                           if self.layout_block is not None and not has_fast_bf16_matmul() else None)
        self.detail = (f"runs of {run}" + (", act-order columns permuted" if order is not None else "")
                       + f", {str(self.compute_dtype).removeprefix('torch.')} activations")

    @property
    def nbytes(self) -> int:
        extra = [self.packed, self.scales_and_zeros, self.dense_scales, self.dense_shifts]
        if self.run_shifts is not None:
            extra.append(self.run_shifts)
        if self.column_order is not None:
            extra.append(self.column_order)
        for copy in (self.dense_fp32, self.dense_bf16):
            if copy is not None and copy.kept is not None:
                extra.append(copy.kept)
        half = kept(self.dense_half)
        return sum(t.numel() * t.element_size() for t in extra) + (half.nbytes if half is not None else 0)

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight (columns in the kernel's order) in `dtype`, dequantized from the packed bytes."""
        codes = unpack_packed(self.packed, self.out_features, self.packed.shape[1] * 2, self.layout_block)
        grouped = codes.view(self.out_features, -1, self.run)
        weight = torch.empty(grouped.shape, dtype=dtype)
        weight.copy_((grouped * self.dense_scales).add_(self.dense_shifts))  # one rounding, fp32 to dtype
        return weight.view(self.out_features, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # At one row the op itself is short: every tensor op around it counts, hence no copies
        # beyond the dtype conversions the op needs and an in-place bias.
        rows = x.reshape(-1, x.shape[-1])
        if self.column_order is not None:
            rows = rows.index_select(1, self.column_order)
        half = kept(self.dense_half)
        if half is not None and half_for(rows.shape[0]):
            out = half(rows.float()).to(x.dtype)
        elif self.dense_fp32 is not None and dense_fp32_for(rows.shape[0], self.dense_fp32.kept is not None):
            out = F.linear(rows.float(), self.dense_fp32.weight()).to(x.dtype)
        elif self.dense_bf16 is not None and dense_bf16_for(rows.shape[0], self.dense_bf16.kept is not None):
            out = F.linear(rows.to(torch.bfloat16), self.dense_bf16.weight()).to(x.dtype)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(self.compute_dtype).contiguous(), self.packed,
                                                             self.run, self.scales_and_zeros)
            if self.run_shifts is not None:
                out = out.float().addmm_(rows.float().view(rows.shape[0], -1, self.run).sum(dim=2), self.run_shifts)
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)


build = Int4PackKernel
