"""A linear layer with int8 weights that also quantizes its input to int8 (W8A8): the matmul
accumulates in int32 and scales the result (per token x per output channel)."""
from __future__ import annotations

import torch

from .base import QuantizedLinear


class W8A8Linear(QuantizedLinear):
    """static: inputs use the stored per-tensor `input_scale`; else a per-token scale at run time."""

    op_name = "w8a8_linear"

    def __init__(self, in_features: int, out_features: int, static: bool = False, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__(in_features, out_features)
        self.static = static
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        if static:
            self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale.float()).to(dtype)

    def op_arguments(self) -> tuple:
        return self.weight, self.weight_scale, self.input_scale, self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations={'static per-tensor' if self.static else 'dynamic per-token'}, bias={self.bias is not None}")
