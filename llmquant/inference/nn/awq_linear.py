"""A linear layer holding AWQ GEMM-packed 4-bit weights; the matmul is an op."""
from __future__ import annotations

import torch

from .. import ops
from .base import QuantizedLinear


class AWQLinear(QuantizedLinear):
    """group_size: input columns per group (a per-channel checkpoint uses in_features)."""

    op_name = "awq_linear"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__(in_features, out_features)
        self.bits = 4
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size, dtype=dtype)

    def op_arguments(self) -> tuple:
        return self.qweight, self.qzeros, self.scales, self.bias, self.group_size

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
