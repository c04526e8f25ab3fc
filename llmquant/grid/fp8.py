"""The FP8 grid: float8 e4m3 (fn: no infinities, largest finite 448) values times a float32 scale.

Weights get one scale per output channel (scale = max|row| / 448), or one per block of
block x block weights (DeepSeek-V3's 128 x 128; partial blocks at the edges), and are cast to
e4m3 with round-to-nearest-even after dividing by their scale, so every weight lies in +-448.
Activations (W8A8-FP8) get one scale per token at run time, the same way.
codes = e4m3(clamp(w / scale, -448, 448)); w_hat = float(codes) * scale.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .affine import PER_CHANNEL

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A row / block of zeros would get scale 0; any positive scale codes it as zeros.
_MIN_SCALE = 1e-12


def to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    """e4m3 codes of values already divided by their scale (saturating: torch's cast of a value
    beyond 448 is not the same on every version)."""
    return scaled.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [..., K], fp32 scales [..., 1]) of x, one scale per row (dynamic per token)."""
    x = rows.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return to_fp8(x / scale), scale


def expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """A [ceil(out / block), ceil(in / block)] table of block scales as one value per weight."""
    rows, columns = shape
    return scale.repeat_interleave(block, dim=0)[:rows].repeat_interleave(block, dim=1)[:, :columns]


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, block: int = 0, dtype=torch.float32) -> torch.Tensor:
    """[out, in] weight from e4m3 codes and their scales: per output channel ([out, 1]) when block
    is 0, else per block ([ceil(out / block), ceil(in / block)])."""
    values = codes.to(torch.float32)
    factors = scale.float() if not block else expand_blocks(scale.float(), tuple(codes.shape), block)
    return (values * factors).to(dtype)


@dataclass
class Fp8Weight:
    """Format-neutral result of putting one [out, in] weight on the FP8 grid.
    codes: float8_e4m3fn [out, in]; scale: fp32 [out, 1] (per channel) or
    [ceil(out / block), ceil(in / block)] (per block); block: 0 for per channel;
    dynamic_activations: activations are quantized to e4m3 per token at run time (W8A8-FP8)."""

    codes: torch.Tensor
    scale: torch.Tensor
    block: int = 0
    dynamic_activations: bool = False
    bits: int = 8
    input_scale: None = None

    @property
    def group_size(self) -> int:
        return self.block or PER_CHANNEL

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.codes, self.scale, self.block, dtype)

    def to(self, device) -> "Fp8Weight":
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device))


@dataclass(frozen=True)
class Fp8Grid:
    """block: 0 for one scale per output channel, else the edge of the square weight blocks sharing
    one scale. dynamic_activations: the layer also rounds its input to e4m3 per token."""

    block: int = 0
    dynamic_activations: bool = False
    bits: int = 8

    @property
    def group_size(self) -> int:
        return self.block or PER_CHANNEL

    def quantize(self, weight: torch.Tensor) -> Fp8Weight:
        w = weight.detach().float()
        if not self.block:
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
            return Fp8Weight(to_fp8(w / scale), scale, 0, self.dynamic_activations)
        rows, columns = w.shape
        b = self.block
        padded = torch.nn.functional.pad(w.abs(), (0, -columns % b, 0, -rows % b))
        blocks = padded.view(padded.shape[0] // b, b, padded.shape[1] // b, b)
        scale = (blocks.amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
        codes = to_fp8(w / expand_blocks(scale, (rows, columns), b))
        return Fp8Weight(codes, scale, b, self.dynamic_activations)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantize(weight).dequantize(weight.dtype)
