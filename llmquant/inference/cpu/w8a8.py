"""W8A8 (int8 weights and activations) on the CPU, keeping the activation-quantization numerics:
x is quantized per token (dynamic) or with the static per-tensor scale exactly as the reference op
does, then multiplied with the int8 weight in one of three ways, chosen by what the CPU has:

- "int_mm" where it has an int8 dot-product instruction (VNNI / AMX): `torch._int_mm` of the int8
  codes, exact int32 accumulation, the scales applied after, as the reference computes; the weight
  is read through a transposed view (the reference copies a transposed weight on every call).
- "fbgemm" elsewhere, where torch has FBGEMM (x86 builds): for calls of fewer than FBGEMM_BELOW_ROWS rows
  (FBGEMM_BESIDE_HALF_BELOW_ROWS where the float16 codes below are kept)
  (decode, short prompts), the same exact integer sums from FBGEMM's int8 GEMM on the codes split into 7-bit
  rows, which cannot saturate (fbgemm_int8.py), the scales applied after. It reads the int8 weight, a
  quarter of the bytes of the fp32 codes; it runs twice the rows, so larger calls take the codes in
  float16 (exact) through FBGEMM's float16 GEMM where it beats fp32 at every call size
  (capability.half_takes_every_call, fbgemm_half.py: the same sums, faster than fp32 where measured), else
  the dense fp32 matmul of the next variant.
- "int8pack" where neither is (aarch64 builds): the codes and the int8 weight codes multiplied as fp32
  numbers (each product and each sum exact up to 2^24, K ~ 1000, and within 2^-24 after), the scales
  applied after: through `_weight_int8pack_mm` in float32 (vectorized there) below DENSE_FP32_FROM_ROWS rows,
  else a dense fp32 matmul of the fp32 codes, kept when prepare_for_cpu grants the memory (the
  dequantized-cache bound; then every call takes it, and every "fbgemm" call past FBGEMM_BELOW_ROWS), else
  converted per call. Not in bfloat16, where x86's packed op is fastest: rounding each integer sum to bf16
  moved SmolLM2's W8A8 perplexity by 0.7% with every call on it, past the 0.1% these paths are held to
  (tests/test_cpu_fast_perplexity.py); nor in float16, whose 65504 the sums pass from K = 5.

LLMQUANT_CPU_W8A8=int_mm | fbgemm | int8pack overrides the choice (eval/bench_cpu.py measures the int8pack
variant beside the chosen one).

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
from . import fbgemm_int8
from .capability import DENSE_FP32_FROM_ROWS, DenseCopy, half_copy, half_for, has_int8_dot_product, kept
from .fused import stacked_bias

NAME = "w8a8"
VARIANT_ENV = "LLMQUANT_CPU_W8A8"
VARIANTS = ("auto", "int_mm", "fbgemm", "int8pack")
ACCEPTS = "W8A8 (compressed-tensors int8) linears, dynamic per-token or static per-tensor activations"
# From here the dense fp32 matmul of the codes beat FBGEMM's split rows (twice the rows) on the forced AVX2
# class: FBGEMM 0.7-1.0x fp32 at 128-512 rows, the dense codes 0.9-1.4x (eval/CPU.md, "W8A8 on FBGEMM").
FBGEMM_BELOW_ROWS = 128
# ... and from here the codes in float16 through FBGEMM, where kept: 1.3-2.7x fp32 at 4-64 rows, where the
# split rows ran 0.9-2.4x (eval/CPU.md, "float16 weights through FBGEMM")
FBGEMM_BESIDE_HALF_BELOW_ROWS = 4


def runnable_variants() -> tuple[str, ...]:
    """The variants this torch build can run (all but "auto"; "fbgemm" only where FBGEMM is there)."""
    return tuple(v for v in VARIANTS[1:] if v != "fbgemm" or fbgemm_int8.available())


def variant_here() -> str:
    """The variant this process runs (module docstring): $LLMQUANT_CPU_W8A8, else the CPU's best."""
    variant = os.environ.get(VARIANT_ENV, "auto")
    if variant not in VARIANTS:
        raise ConfigError(f"{VARIANT_ENV} must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "fbgemm" and not fbgemm_int8.available():
        raise ConfigError(f"{VARIANT_ENV}=fbgemm, but this torch build has no FBGEMM int8 GEMM")
    if variant != "auto":
        return variant
    if has_int8_dot_product():
        return "int_mm"
    return "fbgemm" if fbgemm_int8.available() else "int8pack"


def refusal(module) -> str | None:
    return None if isinstance(module, W8A8Linear) else "not a W8A8 linear"


def fusion_refusal(modules) -> str | None:
    scales = {None if m.input_scale is None else float(m.input_scale) for m in modules}
    if len(scales) > 1:
        return "their activations are quantized differently (static scales differ, or static and dynamic)"
    return None


class W8A8Kernel:
    """`modules`: one W8A8 linear, or several reading one input (fusion_refusal None), outputs end to end."""

    def __init__(self, modules, activation_dtype: torch.dtype, variant: str | None = None):
        self.variant = variant_here() if variant is None else variant
        first = modules[0]
        self.weight = first.weight if len(modules) == 1 else torch.cat([m.weight for m in modules])
        self.input_scale = first.input_scale
        self.weight_scale = torch.cat([m.weight_scale.float().reshape(1, -1) for m in modules], dim=1)
        self.bias = stacked_bias(modules, torch.float32)
        self.stacked = len(modules) > 1  # the stacked int8 weight is a copy; a single one is the module's own
        self.out_features = self.weight.shape[0]
        self.fbgemm = fbgemm_int8.FbgemmInt8Products(self.weight) if self.variant == "fbgemm" else None
        int8pack = self.variant == "int8pack"
        self.dense_fp32 = (None if self.variant == "int_mm" else
                           DenseCopy(lambda: self.weight.float(), self.weight.numel() * 4))
        # the codes in float16 (exact) through FBGEMM's float16 GEMM, for the calls past the int8 GEMM's rows
        self.dense_half = half_copy(lambda: self.weight.float(), self.weight.numel()) if self.fbgemm is not None else None
        self.unit_scales = torch.ones(self.out_features, dtype=torch.float32) if int8pack else None
        activations = "static per-tensor" if self.input_scale is not None else "dynamic per-token"
        self.detail = f"{activations} activations, " + {
            "int_mm": "int8 x int8 torch._int_mm",
            "fbgemm": f"int8 x int8 FBGEMM on 7-bit split rows below {FBGEMM_BESIDE_HALF_BELOW_ROWS} rows and "
                      f"the codes in float16 from there where kept, else below {FBGEMM_BELOW_ROWS} rows and the codes "
                      "in fp32 from there",
            "int8pack": "int8 codes through _weight_int8pack_mm at decode, a dense fp32 matmul of the codes at prefill",
        }[self.variant]

    @property
    def nbytes(self) -> int:
        extra = [] if self.unit_scales is None else [self.unit_scales]
        if self.stacked:
            extra.append(self.weight)
        if self.dense_fp32 is not None and self.dense_fp32.kept is not None:
            extra.append(self.dense_fp32.kept)
        packed = [p for p in (self.fbgemm, kept(self.dense_half)) if p is not None]
        return sum(t.numel() * t.element_size() for t in extra) + sum(p.nbytes for p in packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the codes as fp32 numbers, the form two of the three variants take them in (int8 only for int_mm)
        codes, x_scale = self._quantize(x.reshape(-1, x.shape[-1]))
        if self.variant == "int_mm":
            # a forced int_mm (LLMQUANT_CPU_W8A8) on a class without an int8 dot product: ops.int8_matmul's
            # exact sum, since oneDNN's int8 GEMM saturates there
            codes = codes.to(torch.int8)
            products = (torch._int_mm(codes, self.weight.t()) if has_int8_dot_product()
                        else ops.int8_matmul(codes, self.weight))
        elif self.fbgemm is not None and codes.shape[0] < (
                FBGEMM_BELOW_ROWS if kept(self.dense_half) is None else FBGEMM_BESIDE_HALF_BELOW_ROWS):
            products = self.fbgemm(codes)
        elif kept(self.dense_half) is not None and half_for(codes.shape[0]):
            products = self.dense_half.kept(codes)
        elif self.fbgemm is not None or codes.shape[0] >= DENSE_FP32_FROM_ROWS or self.dense_fp32.kept is not None:
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
