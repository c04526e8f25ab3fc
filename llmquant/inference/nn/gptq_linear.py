"""A linear layer holding GPTQ-packed weights; memory is the packed size, the matmul is an op."""
from __future__ import annotations

import torch

from .. import ops
from .base import QuantizedLinear


class GPTQLinear(QuantizedLinear):
    op_name = "gptq_linear"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, num_groups: int,
                 zero_offset: int = 1, bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__(in_features, out_features)
        self.bits = bits
        self.group_size = group_size
        self.zero_offset = zero_offset
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(num_groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(num_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx,
                                   self.bits, self.zero_offset, dtype=dtype)

    def op_arguments(self) -> tuple:
        return self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, self.bits, self.zero_offset

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
