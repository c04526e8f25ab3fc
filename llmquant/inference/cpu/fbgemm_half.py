"""Products of fp32 rows with a weight rounded to float16, through FBGEMM's packed float16 GEMM.

FBGEMM (in every x86 torch build) keeps the weight packed in float16 and multiplies fp32 rows with it in
fp32: each weight is converted to fp32 in registers, the sums are fp32, the rows and the output are not
rounded (unlike torch's float16 gemv, which rounds both to float16). So the only error is the weight's
rounding to float16, ~2^-11 relative, and none for integers up to 2048: W8A8's weight codes and 8-bit
codes go through exactly. It reads half the bytes of an fp32 weight, which is what a decode step waits
on, and its kernels kept up with or beat an fp32 matmul at prefill sizes where measured (eval/CPU.md,
"float16 weights through FBGEMM"); whether they do on this CPU is measured once (capability.half_gemm_gains).

FBGEMM chooses its kernels from the CPU's flags, capped by FBGEMM_ENABLE_INSTRUCTIONS (capability's
AVX2_CLASS_VARIABLES). The packing takes fp32 weights and no quantized tensors. Where the op is missing
(non-x86 builds), `available()` is False and the paths keep their other forms.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from .fbgemm_packed import packed_weight, register


@lru_cache
def available() -> bool:
    """Whether this torch build packs and multiplies a float16 weight through FBGEMM (checked once)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        products = FbgemmHalfProducts(weight)(torch.tensor([[-128.0, 127.25]]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return torch.equal(products, torch.tensor([[-128.0 - 254.5, -384.0 + 63.625]]))


@torch.library.custom_op("llmquant::fbgemm_half_products", mutates_args=())
def _compiled_products(rows: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(rows, packed_weight(handle))


@_compiled_products.register_fake
def _(rows: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], out_features)


class FbgemmHalfProducts:
    """`weight` [N, K] (fp32, or float16) -> a callable mapping fp32 rows [M, K] to rows @ weight16^T, [M, N] in
    fp32, weight16 the weight rounded to float16 (to nearest)."""

    def __init__(self, weight: torch.Tensor):
        self.out_features, in_features = weight.shape
        with warnings.catch_warnings():
            # FBGEMM warns when it clamps weights past float16's range (65504): none of ours is near it
            warnings.simplefilter("ignore", UserWarning)
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None)
        self.nbytes = self.out_features * in_features * 2
        self.handle = register(self, self.packed)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.llmquant.fbgemm_half_products(rows, self.handle, self.out_features)
        return torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
