"""The affine (scale / zero-point) integer grid, per output channel or per input group.

Conventions follow IST-DASLab's GPTQ quantizer so results compare with the literature:
- the range always includes 0 (xmin <= 0 <= xmax);
- symmetric: scale = 2 * absmax / maxq, zero = (maxq + 1) / 2 (8 at 4 bits);
- asymmetric: scale = (xmax - xmin) / maxq, zero = round(-xmin / scale);
- codes = clamp(round(w / scale) + zero, 0, maxq); w_hat = (codes - zero) * scale.
Scales are rounded to fp16 before the codes are chosen, because checkpoints store them in
fp16: the fake-quantized weight is then exactly what a loader reconstructs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# group_size meaning one group per output channel (GPTQ's -1)
PER_CHANNEL = -1

# Smallest normal fp16: a scale below it would lose precision (or flush to 0) when stored.
_MIN_SCALE = 2.0**-14


@dataclass
class QuantizedWeight:
    """Format-neutral result of quantizing one [out, in] weight.

    codes: uint8 [out, in], integers in [0, 2**bits - 1].
    scale: float32 [out, n_groups] (values exactly representable in fp16).
    zero: int32 [out, n_groups].
    group_index: int32 [in], the group of each input column (GPTQ's g_idx; permuted by act-order).
    input_scale: for layers whose activations are quantized too (W8A8) with a static
    per-tensor grid, that grid's scale (fp32 [1]); None for weight-only or dynamic activations.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_index: torch.Tensor
    bits: int
    group_size: int
    input_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        groups = self.scale.shape[1]
        width = in_features if groups == 1 or self.group_size == PER_CHANNEL else self.group_size
        if groups == 1 or (in_features == groups * width and torch.equal(
                self.group_index, torch.arange(in_features, dtype=self.group_index.dtype,
                                               device=self.group_index.device) // width)):
            # contiguous groups: one scale per [out, group] broadcast over the group's columns, the
            # same arithmetic as the gather below without materializing [out, in] scales and zeros
            codes = self.codes.to(dtype).reshape(out_features, groups, width)
            zero, scale = self.zero.to(dtype)[..., None], self.scale.to(dtype)[..., None]
            return ((codes - zero) * scale).view(out_features, in_features)
        g = self.group_index.long()
        return ((self.codes.to(dtype) - self.zero[:, g].to(dtype)) * self.scale[:, g].to(dtype)).contiguous()

    def to(self, device) -> "QuantizedWeight":
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device), zero=self.zero.to(device),
                       group_index=self.group_index.to(device),
                       input_scale=None if self.input_scale is None else self.input_scale.to(device))


@dataclass(frozen=True)
class AffineGrid:
    """bits: 2..8. group_size: columns per group, or -1 for one group per output channel.
    min_zero: smallest zero point allowed for asymmetric grids; formats that store
    zero - 1 in unsigned bits (GPTQ v1) cannot represent zero 0 and ask for 1.
    clip_search: shrink each group's range where that lowers sum |w - w_hat|^2.4 (the MSE option
    of the reference GPTQ quantizer: shrink factors 1, 0.99, ... down to 0.21).
    """

    bits: int
    symmetric: bool = True
    group_size: int = PER_CHANNEL
    min_zero: int = 0
    clip_search: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def num_groups(self, in_features: int) -> int:
        if self.group_size == PER_CHANNEL:
            return 1
        return -(-in_features // self.group_size)

    def group_index(self, in_features: int, device=None) -> torch.Tensor:
        return torch.arange(in_features, dtype=torch.int32, device=device) // self.group_width(in_features)

    def qparams_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for ranges [xmin, xmax] (any matching shapes)."""
        xmin = xmin.float().clamp(max=0)
        xmax = xmax.float().clamp(min=0)
        if self.symmetric:
            absmax = torch.maximum(-xmin, xmax)
            absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
            scale = _to_fp16_grid(2 * absmax / self.maxq)
            zero = torch.full_like(scale, (self.maxq + 1) // 2, dtype=torch.int32)
            return scale, zero
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = _to_fp16_grid((xmax - xmin) / self.maxq)
        zero = torch.round(-xmin / scale)
        if self.min_zero > 0:
            # Shift the grid up so that zero >= min_zero still covers xmax; the points lost
            # below zero were unused, since rounding put zero under min_zero.
            low = zero < self.min_zero
            shifted_scale = _to_fp16_grid(xmax / (self.maxq - self.min_zero))
            scale = torch.where(low, shifted_scale, scale)
            zero = torch.where(low, torch.full_like(zero, self.min_zero), torch.round(-xmin / scale))
        return scale, zero.clamp(self.min_zero, self.maxq).to(torch.int32)

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of shape [out, n_groups] for a [out, in] weight."""
        return self._range_qparams(*self._groups(weight.detach().float()))

    def _groups(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """grouped(), with valid None (and no copy) when the groups divide the row."""
        out_features, in_features = weight.shape
        width = self.group_width(in_features)
        if in_features % width == 0:
            return weight.view(out_features, in_features // width, width), None
        return self.grouped(weight)

    def group_width(self, in_features: int) -> int:
        """Columns per group (the whole row per channel); the last group may be partial."""
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def grouped(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [out, groups, width], valid [out, groups, width]): the weight split into its groups,
        a partial last group padded with zeros that `valid` marks as not part of the weight."""
        out_features, in_features = weight.shape
        width = self.group_width(in_features)
        groups = -(-in_features // width)
        pad = groups * width - in_features
        valid = torch.ones(out_features, in_features, dtype=torch.bool, device=weight.device)
        valid = torch.nn.functional.pad(valid, (0, pad), value=False).view(out_features, groups, width)
        return torch.nn.functional.pad(weight, (0, pad)).view(out_features, groups, width), valid

    @staticmethod
    def group_ranges(w: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over the last dim of w, counting only `valid` entries (None: all)."""
        if valid is None:
            return w.amin(dim=-1), w.amax(dim=-1)
        return torch.where(valid, w, torch.inf).amin(dim=-1), torch.where(valid, w, -torch.inf).amax(dim=-1)

    def _range_qparams(self, w: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """qparams over the last dim of w, counting only `valid` entries (a partial last group is
        padded; None: no padding)."""
        xmin, xmax = self.group_ranges(w, valid)
        scale, zero = self.qparams_from_range(xmin, xmax)
        if not self.clip_search:
            return scale, zero
        best = torch.full_like(scale, torch.inf)
        for step in range(80):
            shrink = 1 - step / 100
            s, z = self.qparams_from_range(shrink * xmin, shrink * xmax)
            error = (self.fake_quantize_values(w, s[..., None], z[..., None]) - w).abs() ** 2.4
            if valid is not None:
                error = torch.where(valid, error, 0)
            error = error.sum(dim=-1)
            better = error < best
            best = torch.where(better, error, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
        return scale, zero

    def quantize_values(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of w under broadcastable scale / zero."""
        return torch.clamp(torch.round(w.float() / scale) + zero, 0, self.maxq)

    @staticmethod
    def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (codes - zero) * scale

    def fake_quantize_values(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.dequantize_values(self.quantize_values(w, scale, zero), scale, zero)

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        """Round-to-nearest codes of a [out, in] weight on this grid."""
        out_features, in_features = weight.shape
        groups, valid = self._groups(weight.detach().float())
        scale, zero = self._range_qparams(groups, valid)
        # each group's codes under its own scale / zero, broadcast (a partial last group is padded)
        codes = self.quantize_values(groups, scale[..., None], zero[..., None]).view(out_features, -1)[:, :in_features]
        group_index = self.group_index(in_features, weight.device)
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scale=scale,
            zero=zero,
            group_index=group_index,
            bits=self.bits,
            group_size=self.group_size,
        )

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantize(weight).dequantize(weight.dtype)


def _to_fp16_grid(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=_MIN_SCALE, max=torch.finfo(torch.float16).max).half().float()
