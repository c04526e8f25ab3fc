"""A linear layer holding float8 e4m3 weights with fp32 scales (compressed-tensors float-quantized);
the matmul is an op: W8A8-FP8 (activations rounded to e4m3 per token) or FP8 weight-only with block scales."""
from __future__ import annotations

import torch

from ...grid.fp8 import FP8_DTYPE, dequantize_fp8
from .base import QuantizedLinear


class Fp8Linear(QuantizedLinear):
    """block: 0 for one weight scale per output channel ([out, 1]), else the block edge (scales
    [ceil(out / block), ceil(in / block)]). dynamic_activations: round x to e4m3 per token (W8A8-FP8,
    per-channel scales only); otherwise x is used as it is (weight-only)."""

    def __init__(self, in_features: int, out_features: int, block: int = 0, dynamic_activations: bool = True,
                 bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        if dynamic_activations == bool(block):
            raise ValueError("llmquant runs FP8 as W8A8 with per-channel weight scales or weight-only with block scales")
        super().__init__(in_features, out_features)
        self.block = block
        self.dynamic_activations = dynamic_activations
        scale_shape = (-(-out_features // block), -(-in_features // block)) if block else (out_features, 1)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, self.block, dtype)

    @property
    def op_name(self) -> str:
        return "fp8_linear" if self.dynamic_activations else "fp8_block_linear"

    def op_arguments(self) -> tuple:
        if self.dynamic_activations:
            return self.weight, self.weight_scale, self.bias
        return self.weight, self.weight_scale, self.bias, self.block

    def extra_repr(self) -> str:
        scales = f"{self.block}x{self.block} blocks" if self.block else "per channel"
        activations = "dynamic per-token e4m3" if self.dynamic_activations else "unquantized"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight e4m3 scaled {scales}, "
                f"activations {activations}, bias={self.bias is not None}")
