"""Any quantized linear through a dequantized weight kept in memory: the path for what no packed op
takes (NF4 / FP4 codebooks, grouped 5-8-bit weights, shapes the packed ops refuse).

The weight is dequantized once, exactly as the reference op dequantizes it on every call, in the
activations' dtype, and the matmul is torch's own dense one: exact against the reference, as fast as
the unquantized model, at the unquantized weight's size in memory (fp32: 8x a 4-bit weight). The
total such memory is bounded (prepare_for_cpu's max_cache_mib, $LLMQUANT_CPU_CACHE_MIB); layers past
the bound stay on the reference. Every call runs in the cached weight's dtype: a bfloat16 prefill
matmul here moved SmolLM2's NF4 perplexity by 0.11%, past the 0.1% this path is held to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import stacked_bias

NAME = "dequantized"
ACCEPTS = "any quantized linear with dequantized_weight(); costs out * in * dtype size of memory"


def refusal(module) -> str | None:
    return None if hasattr(module, "dequantized_weight") else "no dequantized_weight()"


def fusion_refusal(modules) -> str | None:
    return None  # dequantized weights of one input width always stack


def cache_bytes(module, activation_dtype: torch.dtype) -> int:
    return module.out_features * module.in_features * torch.empty(0, dtype=activation_dtype).element_size()


class DequantizedKernel:
    """`modules`: one linear, or several reading one input (fusion_refusal None), output channels end to end."""

    def __init__(self, modules, activation_dtype: torch.dtype):
        self.weight = torch.cat([m.dequantized_weight(activation_dtype) for m in modules]).contiguous()
        self.bias = stacked_bias(modules, activation_dtype)
        self.detail = f"{str(activation_dtype).removeprefix('torch.')} weight cached"

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


build = DequantizedKernel
