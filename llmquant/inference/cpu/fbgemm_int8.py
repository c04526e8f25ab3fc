"""Exact int8 x int8 products on a CPU without an int8 dot product, through FBGEMM.

There, torch._int_mm (oneDNN) sums pairs of u8 x s8 products in saturating 16-bit lanes (eval/CPU.md,
"W8A8 without an int8 dot product"). FBGEMM's AVX2 kernels form the same pairs, but cannot saturate when
the activations are 7-bit: 2 x 127 x 128 < 2^15 (what its `reduce_range` is for). So every row of codes
c in [-128, 127] becomes two 7-bit rows, c = 2a + b with a = floor(c / 2) in [-64, 63] and b in {0, 1}:

    c . w = 2 (a . w) + (b . w)

from one FBGEMM call on the stacked rows, which reads the int8 weight once (a quarter of an fp32 weight's
bytes: decode is bound by them). The call is `quantized::linear_dynamic`, which quantizes its fp32 input
to 7 bits with one scale and zero point for the tensor, from its minimum and maximum: two sentinel rows
holding -64 and 63 make them exactly 1 and 64, so every value passes through unchanged (FBGEMM removes
the zero point in exact integer arithmetic), and the exact int32 sums come back as fp32 numbers (exact
below 2^24, as the dense fp32 matmul of the codes is). The weight is packed once, with unit per-channel
scales.

FBGEMM chooses its kernels from the CPU's own flags, capped by FBGEMM_ENABLE_INSTRUCTIONS (AVX2, AVX512,
...), not by ATEN_CPU_CAPABILITY: playing the AVX2 class on a larger CPU needs both (capability.py).
torch.compile cannot trace the packed weight, so a compiled graph calls it through a custom op that takes a
handle to it (fbgemm_packed.py). PyTorch deprecates quantized tensors, which the packing goes through:
where they, or FBGEMM (non-x86 builds), are missing, `available()` is False and W8A8 takes another path.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from .fbgemm_packed import packed_weight, register

HIGH_MIN, HIGH_MAX = -64, 63  # floor(c / 2) of the int8 codes c: a 7-bit range, as the sentinel rows span it


@lru_cache
def available() -> bool:
    """Whether this torch build has FBGEMM and packs a weight for it (checked once, on a tiny weight)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        weight = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        products = FbgemmInt8Products(weight)(torch.tensor([[-128.0, 127.0]]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return torch.equal(products, torch.tensor([[-128.0 - 254.0, -384.0 + 508.0]]))


@torch.library.custom_op("llmquant::fbgemm_int8_products", mutates_args=())
def _compiled_products(rows: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(rows, packed_weight(handle), True)


@_compiled_products.register_fake
def _(rows: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], out_features)


class FbgemmInt8Products:
    """`weight` int8 [N, K] -> a callable mapping codes [M, K] (fp32 integers in [-128, 127]) to their exact
    integer products with the weight, [M, N] in fp32."""

    def __init__(self, weight: torch.Tensor):
        out_features, in_features = weight.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the deprecation of quantized tensors (docstring)
            quantized = torch._make_per_channel_quantized_tensor(
                weight.contiguous(), torch.ones(out_features, dtype=torch.float64),
                torch.zeros(out_features, dtype=torch.long), 0)
            engine = torch.backends.quantized.engine
            torch.backends.quantized.engine = "fbgemm"
            try:
                self.packed = torch.ops.quantized.linear_prepack(quantized, None)
            finally:
                torch.backends.quantized.engine = engine
        self.out_features = out_features
        self.sentinel = torch.zeros(2, in_features)  # two rows: any in_features
        self.sentinel[:, 0] = torch.tensor([HIGH_MIN, HIGH_MAX])
        self.nbytes = weight.numel() + 4 * out_features + 8 * in_features  # packed codes, column sums, sentinel
        self.handle = register(self, self.packed)

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        rows = codes.shape[0]
        high = torch.div(codes, 2, rounding_mode="floor")
        split = torch.cat([high, torch.sub(codes, high, alpha=2), self.sentinel])
        if torch.compiler.is_compiling():
            sums = torch.ops.llmquant.fbgemm_int8_products(split, self.handle, self.out_features)
        else:
            sums = torch.ops.quantized.linear_dynamic(split, self.packed, True)
        return torch.add(sums[rows:2 * rows], sums[:rows], alpha=2)
