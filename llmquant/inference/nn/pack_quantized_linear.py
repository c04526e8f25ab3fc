"""A linear layer holding compressed-tensors "pack-quantized" weights (llm-compressor's W4A16,
W8A16, ...), under the tensor names that format uses; the matmul is the GPTQ op.

The two layouts are one bit stream read two ways: `weight_packed` [out, in * bits / 32] packs each
row's codes (signed code + 2^(bits-1)) low bits first along the input dim, which is GPTQ's `qweight`
transposed; a packed `weight_zero_point` [out * bits / 32, groups] transposed is GPTQ's `qzeros`
(stored without GPTQ v1's -1). So after loading, the GPTQ-layout views are built once and every
forward runs through ops.gptq_linear.
"""
from __future__ import annotations

import torch

from ...storage import bitpack
from .. import ops
from .base import QuantizedLinear


class PackQuantizedLinear(QuantizedLinear):
    """group_size: input columns per group (in_features for one group per output channel);
    symmetric: no stored zero point (codes centred on 2^(bits-1)); g_idx: the checkpoint stores
    `weight_g_idx` (activation order with group scales)."""

    op_name = "gptq_linear"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 g_idx: bool = False, scale_dtype: torch.dtype = torch.float16, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__(in_features, out_features)
        self.bits = bits
        self.group_size = group_size
        groups = -(-in_features // group_size)
        self.register_buffer("weight_packed", torch.empty(out_features, in_features * bits // 32, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64, device=device))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.empty(out_features * bits // 32, groups, dtype=torch.int32,
                                                                  device=device))
        if g_idx:
            self.register_buffer("weight_g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        else:
            self.weight_g_idx = None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight_packed" in state_dict:
            self._build_gptq_layout()

    def _build_gptq_layout(self) -> None:
        """Non-persistent GPTQ-layout tensors (qweight, qzeros, scales, g_idx) for the op."""
        device = self.weight_packed.device
        if self.weight_zero_point is None:
            groups = self.weight_scale.shape[1]
            centre = torch.full((groups, self.out_features), 2 ** (self.bits - 1), dtype=torch.int32)
            qzeros = bitpack.pack(centre, self.bits, dim=1).to(device)
        else:
            qzeros = self.weight_zero_point.t().contiguous()
        if self.weight_g_idx is None:
            g_idx = torch.arange(self.in_features, dtype=torch.int32, device=device) // self.group_size
        else:
            g_idx = self.weight_g_idx.to(torch.int32)
        self.register_buffer("qweight", self.weight_packed.t().contiguous(), persistent=False)
        self.register_buffer("qzeros", qzeros, persistent=False)
        self.register_buffer("scales", self.weight_scale.t().contiguous(), persistent=False)
        self.register_buffer("g_idx", g_idx, persistent=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, 0, dtype=dtype)

    def op_arguments(self) -> tuple:
        return self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, self.bits, 0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.weight_zero_point is None}, "
                f"bias={self.bias is not None}")
