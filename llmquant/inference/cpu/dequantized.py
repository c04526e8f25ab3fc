"""Any quantized linear through a dequantized weight kept in memory: the path for what no packed op
takes (NF4 / FP4 codebooks, grouped 5-8-bit weights, shapes the packed ops refuse).

The weight is dequantized once, exactly as the reference op dequantizes it on every call, and kept in
float16 under float32 activations (in the activations' dtype otherwise): half the memory of an fp32
copy (still 4x a 4-bit weight), and at one row (batch-1 decode) torch's float16 matrix-vector product
(fp32 accumulation) reads half the bytes of an fp32 one, which is what a decode step waits on
(NF4 decode with either cache: eval/CPU.md). Rounding the dequantized
weight and the one-row input to float16 costs ~2^-11 relative; the float16 range (65504) is the one
GPU inference runs these models in. Calls of many rows (prefill) on a CPU that multiplies bfloat16
natively (capability.dense_bf16_for, as the packed paths decide) run two dense bfloat16 matmuls, of
the cached weight split for the call into a bf16 part and the bf16 rest (together exactly the float16
cache), so that only the input rounds to bf16 (prefill against fp32: eval/CPU.md; tests/test_cpu_fast_perplexity.py
holds the perplexity within 0.1% of the reference op, which one bf16 copy of the weight missed). Other calls of more rows upcast
the weight for the call and run the activations' dtype, since torch's float16 matmul of many rows is
slower than fp32 on CPUs without native float16. The total such memory is bounded
(prepare_for_cpu's max_cache_mib, $LLMQUANT_CPU_CACHE_MIB); layers past the bound stay on the reference.
Whether the float16 gemv is the faster at one row depends on the CPU's memory bandwidth per core,
not on a flag: capability.half_gemv_is_faster measures it once. Where it is not, and on the AVX2 class
(no native bf16), where upcasting the float16 cache for each call of many rows made prefill slower
than the fp32 model's, prepare_for_cpu keeps an fp32 copy while the same bound allows (selection._keep_dense_copies)
and the calls the float16 cache does not win run on it (where it is kept, calls of fewer than
SPLIT_FROM_ROWS rows run on it on the native class too). Where torch has FBGEMM and its float16 GEMM beats
fp32 at one row and at many (capability.half_takes_every_call, measured), the float16 cache is also kept
packed by FBGEMM (fbgemm_half.py) and takes every call of fp32 rows instead: the same float16 weight,
with the rows and the sums in fp32 (exactly the reference's products with the cached weight, to fp32
rounding), and no fp32 copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .capability import DenseCopy, dense_bf16_for, half_copy, half_for, half_gemv_is_faster, kept
from .fused import stacked_bias

NAME = "dequantized"
ACCEPTS = "any quantized linear with dequantized_weight(); costs out * in * 2 bytes of memory (float16)"
HALF_GEMV_MAX_ROWS = 1  # calls of up to this many rows run in the cached float16 itself
# Where an fp32 copy is kept, calls of fewer rows run on it rather than on the float16 cache split into
# bf16 parts for the call: the split's passes over the weight cost more than two bf16 matmuls save below
# about this many rows (0.4-0.7x fp32 at 128-256 rows in an ad hoc run of eval/cpu_crossover.py's NF4
# rows; eval/CPU.md, "Per call size").
SPLIT_FROM_ROWS = 512


def refusal(module) -> str | None:
    return None if hasattr(module, "dequantized_weight") else "no dequantized_weight()"


def fusion_refusal(modules) -> str | None:
    return None  # dequantized weights of one input width always stack


def cache_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if activation_dtype == torch.float32 else activation_dtype


def cache_bytes(module, activation_dtype: torch.dtype) -> int:
    return module.out_features * module.in_features * cache_dtype(activation_dtype).itemsize


class DequantizedKernel:
    """`modules`: one linear, or several reading one input (fusion_refusal None), output channels end to end."""

    def __init__(self, modules, activation_dtype: torch.dtype):
        dtype = cache_dtype(activation_dtype)
        self.weight = torch.cat([m.dequantized_weight(activation_dtype).to(dtype) for m in modules]).contiguous()
        self.bias = stacked_bias(modules, activation_dtype)
        self.out_features = self.weight.shape[0]
        self.half_gemv = half_gemv_is_faster()  # measured once: one-row calls take the float16 cache
        # the fp32 copy from the modules' own dequantization: the reference's weight, not the float16 cache's
        self.dense_fp32 = DenseCopy(lambda: torch.cat([m.dequantized_weight(torch.float32) for m in modules]),
                                    self.weight.numel() * 4) \
            if self.weight.dtype != torch.float32 and activation_dtype == torch.float32 else None
        # the float16 cache packed by FBGEMM: fp32 rows and sums, kept where it beats fp32 at every call size
        self.dense_half = half_copy(lambda: self.weight, self.weight.numel()) if self.dense_fp32 is not None else None
        self.detail = f"{str(dtype).removeprefix('torch.')} weight cached"

    @property
    def nbytes(self) -> int:
        half = kept(self.dense_half)
        return (sum(t.numel() * t.element_size() for t in (self.weight, kept(self.dense_fp32)) if t is not None)
                + (half.nbytes if half is not None else 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        half = kept(self.dense_half)
        fp32 = kept(self.dense_fp32)
        # kept where the float16 gemv is not the faster (measured) or the class has no native bf16
        # for many rows (the AVX2 class)
        on_kept = fp32 is not None and x.dtype == torch.float32
        if half is not None and x.dtype == torch.float32 and half_for(rows.shape[0]):
            out = half(rows)
        elif rows.shape[0] <= HALF_GEMV_MAX_ROWS and (fp32 is None or self.half_gemv):
            out = F.linear(rows.to(self.weight.dtype), self.weight).to(x.dtype)
        elif on_kept and rows.shape[0] < SPLIT_FROM_ROWS:
            out = F.linear(rows, fp32)
        elif dense_bf16_for(rows.shape[0]):
            high, low = bf16_parts(self.weight)
            row16 = rows.to(torch.bfloat16)
            out = F.linear(row16, high).float().add_(F.linear(row16, low).float()).to(x.dtype)
        elif on_kept:
            out = F.linear(rows, fp32)
        else:
            out = F.linear(rows, self.weight.to(x.dtype))
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def bf16_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float16 weight as two bf16 tensors whose sum is exactly it (8 + 8 significant bits hold float16's
    11): the weight's rounding, the same on every token, is what moves perplexity (a single bf16 copy took
    SmolLM2 NF4 0.18% off the reference); the input's rounds per token and averages out."""
    high = weight.to(torch.bfloat16)
    return high, (weight.float() - high.float()).to(torch.bfloat16)


build = DequantizedKernel
