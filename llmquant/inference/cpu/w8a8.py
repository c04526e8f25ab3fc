"""W8A8 (int8 weights and activations) on the CPU, keeping the activation-quantization numerics:
x is quantized per token (dynamic) or with the static per-tensor scale exactly as the reference op
does, then multiplied with the int8 weight in one of two ways, chosen by what the CPU has:

- "int_mm" where it has an int8 dot-product instruction (VNNI / AMX): `torch._int_mm` of the int8
  codes, exact int32 accumulation, the scales applied after, as the reference computes; the weight
  is read through a transposed view (the reference copies a transposed weight on every call).
- "int8pack" elsewhere: the int8 codes through `_weight_int8pack_mm` with unit scales, in float32,
  then both scales in fp32, instead of an int8 GEMM, far slower than fp32 without VNNI.
  float32 whatever the activations' dtype: the products of two int8 codes sum to up to 16129 * K,
  past float16's 65504 from K = 5 (inf), and float32 holds these integer sums exactly up to 2^24
  (K ~ 1000) and within 2^-24 after. Not in bfloat16, where the packed op is fastest: rounding the
  integer products to bf16 moves SmolLM2's W8A8 perplexity past the 0.1% this path is held to
  (tests/test_cpu_fast_perplexity.py).

Without an int8 dot product, calls of DENSE_FP32_FROM_ROWS rows or more (prefill) never take int8pack
either (far slower than fp32 there): the activation codes, quantized exactly as above, and the int8 weight codes
are multiplied as fp32 numbers in a dense fp32 matmul (each product and each sum exact up to 2^24, as in
the int8pack variant), the scales applied after. The weight codes in fp32 are kept when prepare_for_cpu
grants the memory (the dequantized-cache bound; then every call, decode too, runs the dense fp32 matmul,
which measured faster than int8pack's fp32 loop at one row), else converted per call.

LLMQUANT_CPU_W8A8=int_mm | int8pack overrides the choice (eval/bench_cpu.py measures both).

Linears reading one input (q/k/v, gate/up) with one activation scheme run as one (fused.py): the
input is quantized once and multiplied with the stacked int8 weights.
"""
from __future__ import annotations

import os

import torch

from .. import ops
from ...errors import ConfigError
from ...grid.activations import quantize_per_tensor_as_float, quantize_per_token_as_float
from ..nn import W8A8Linear
from .capability import DENSE_FP32_FROM_ROWS, DenseCopy, has_int8_dot_product
from .fused import stacked_bias

NAME = "w8a8"
VARIANT_ENV = "LLMQUANT_CPU_W8A8"
VARIANTS = ("auto", "int_mm", "int8pack")
ACCEPTS = "W8A8 (compressed-tensors int8) linears, dynamic per-token or static per-tensor activations"


def use_int_mm_here() -> bool:
    variant = os.environ.get(VARIANT_ENV, "auto")
    if variant not in VARIANTS:
        raise ConfigError(f"{VARIANT_ENV} must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return has_int8_dot_product() if variant == "auto" else variant == "int_mm"


def refusal(module) -> str | None:
    return None if isinstance(module, W8A8Linear) else "not a W8A8 linear"


def fusion_refusal(modules) -> str | None:
    scales = {None if m.input_scale is None else float(m.input_scale) for m in modules}
    if len(scales) > 1:
        return "their activations are quantized differently (static scales differ, or static and dynamic)"
    return None


class W8A8Kernel:
    """`modules`: one W8A8 linear, or several reading one input (fusion_refusal None), outputs end to end."""

    def __init__(self, modules, activation_dtype: torch.dtype, use_int_mm: bool | None = None):
        self.use_int_mm = use_int_mm_here() if use_int_mm is None else use_int_mm
        first = modules[0]
        self.weight = first.weight if len(modules) == 1 else torch.cat([m.weight for m in modules])
        self.input_scale = first.input_scale
        self.weight_scale = torch.cat([m.weight_scale.float().reshape(1, -1) for m in modules], dim=1)
        self.bias = stacked_bias(modules, torch.float32)
        self.stacked = len(modules) > 1  # the stacked int8 weight is a copy; a single one is the module's own
        self.out_features = self.weight.shape[0]
        self.dense_fp32 = None if self.use_int_mm else DenseCopy(lambda: self.weight.float(), self.weight.numel() * 4)
        # int8pack in fp32, the dtype the codes come in (module docstring)
        self.unit_scales = None if self.use_int_mm else torch.ones(self.out_features, dtype=torch.float32)
        activations = "static per-tensor" if self.input_scale is not None else "dynamic per-token"
        self.detail = f"{activations} activations, " + ("int8 x int8 torch._int_mm" if self.use_int_mm else
                                                        "int8 codes through _weight_int8pack_mm at decode, "
                                                        "a dense fp32 matmul of the codes at prefill")

    @property
    def nbytes(self) -> int:
        extra = [] if self.unit_scales is None else [self.unit_scales]
        if self.stacked:
            extra.append(self.weight)
        if self.dense_fp32 is not None and self.dense_fp32.kept is not None:
            extra.append(self.dense_fp32.kept)
        return sum(t.numel() * t.element_size() for t in extra)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the codes as fp32 numbers, the form two of the three products take them in (int8 only for int_mm)
        codes, x_scale = self._quantize(x.reshape(-1, x.shape[-1]))
        if self.use_int_mm:
            # a forced int_mm (LLMQUANT_CPU_W8A8) on a class without an int8 dot product: ops.int8_matmul's
            # exact sum, since oneDNN's int8 GEMM saturates there
            codes = codes.to(torch.int8)
            products = (torch._int_mm(codes, self.weight.t()) if has_int8_dot_product()
                        else ops.int8_matmul(codes, self.weight))
        elif codes.shape[0] >= DENSE_FP32_FROM_ROWS or self.dense_fp32.kept is not None:
            products = torch.nn.functional.linear(codes, self.dense_fp32.weight())
        else:
            products = torch.ops.aten._weight_int8pack_mm(codes, self.weight, self.unit_scales)
        out = products.to(torch.float32).mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_scale is None:
            return quantize_per_token_as_float(rows)
        return quantize_per_tensor_as_float(rows, self.input_scale), self.input_scale.float().reshape(1, 1)


build = W8A8Kernel
