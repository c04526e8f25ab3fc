"""Symmetric int8 activation grids, as W8A8 serving engines apply them at run time.

- per token (dynamic): each row gets scale = max|x_row| / 127, computed from the row itself;
- per tensor (static): one scale fixed at calibration (see observers), values beyond
  +-127 * scale saturate.
codes = clamp(round(x / scale), -128, 127); x_hat = codes * scale.
"""
from __future__ import annotations

import torch

from .observers import INT8_QMAX

# A row of zeros would get scale 0; any positive scale quantizes it to zeros.
_MIN_SCALE = 1e-12


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scales [..., 1]) of x, one scale per row (last dim = features)."""
    codes, scale = quantize_per_token_as_float(x)
    return codes.to(torch.int8), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of x under one static scale."""
    return quantize_per_tensor_as_float(x, scale).to(torch.int8)


def quantize_per_token_as_float(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token codes as fp32 numbers, with the fp32 scales [..., 1], for paths that multiply the
    codes in fp32 (no int8 round trip). No clamp: |x / scale| rounds to at most 127 here. |x|'s amax,
    not aminmax: torch's aminmax over the last dim is several times slower than abs then amax."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_QMAX).clamp_(min=_MIN_SCALE)
    return torch.div(x, scale).round_(), scale


def quantize_per_tensor_as_float(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The codes under one static scale as fp32 numbers, saturated at -128 / 127."""
    return torch.div(x.float(), scale.float()).round_().clamp_(-INT8_QMAX - 1, INT8_QMAX)


def fake_quantize(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """x on the int8 grid: per token when input_scale is None, else per tensor."""
    if input_scale is None:
        codes, scale = quantize_per_token(x)
        return codes.float() * scale
    return quantize_per_tensor(x, input_scale).float() * input_scale.float()
