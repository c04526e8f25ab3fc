"""GPTQ (Frantar et al., 2022): round columns one at a time, pushing each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Follows IST-DASLab's `fasterquant`: dead input columns (zero Hessian diagonal) are zeroed,
optional act-order (columns by descending Hessian diagonal), damping `damp` x mean diagonal,
the upper Cholesky factor of H^-1, and lazy batches of `block_size` columns. Two departures:
- group scales chosen as the sweep reaches a group are computed from the group's current
  (error-updated) weights, also for columns inside the lazy batch, where the reference
  reads stale values, and for columns past it, which first get the batch's error so far
  (so the lazy batch size changes no code or scale, whatever the group size);
- when the Cholesky factorization fails, damping is raised step by step (with a warning
  naming the layer) instead of aborting the run.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import LlmquantError
from ..grid import PER_CHANNEL, AffineGrid, QuantizedWeight
from .statistics import InputGram

# Damping is multiplied by this factor after each failed factorization, up to MAX_DAMP
# (expressed, like `damp`, as a fraction of the mean Hessian diagonal).
DAMP_GROWTH = 4.0
MAX_DAMP = 10.0


class GPTQ:
    name = "gptq"
    needs_calibration = True

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                 static_groups: bool = False, first_token_weight: float = 1.0):
        self.block_size = block_size
        self.damp = damp
        self.act_order = act_order
        self.static_groups = static_groups
        self.first_token_weight = first_token_weight

    @property
    def statistics_options(self) -> dict:
        return {"first_token_weight": self.first_token_weight} if self.first_token_weight != 1 else {}

    def quantize(self, weight: torch.Tensor, grid: AffineGrid, statistics: InputGram | None,
                 layer_name: str = "layer") -> QuantizedWeight:
        if statistics is None or statistics.rows == 0:
            # no calibration input reached the layer (an expert the router never chose): without a
            # Hessian there is no error to push onto other columns, so each weight is rounded to nearest
            return grid.quantize(weight)
        hessian = 2 * statistics.gram / max(statistics.rows, 1)
        return gptq_quantize(weight, hessian, grid, self.block_size, self.damp, self.act_order,
                             self.static_groups, layer_name)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, layer_name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + d I)^-1, raising d until the factorization succeeds."""
    mean_diag = torch.mean(torch.diag(hessian)).item()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    fraction = damp
    while True:
        damped = hessian + fraction * mean_diag * identity
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if fraction != damp:
                    warnings.warn(f"{layer_name}: Hessian not positive-definite with damp {damp:g}; "
                                  f"used damp {fraction:g}", RuntimeWarning, stacklevel=3)
                return upper
        next_fraction = max(fraction * DAMP_GROWTH, 1e-4)
        if next_fraction > MAX_DAMP:
            raise LlmquantError(
                f"{layer_name}: the Hessian stays singular even with damping {fraction:g} x its mean diagonal; "
                "the calibration inputs of this layer are degenerate (check for constant or missing data)"
            )
        fraction = next_fraction


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: AffineGrid, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  layer_name: str = "layer") -> QuantizedWeight:
    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    out_features, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = grid.group_size != PER_CHANNEL
    group_size = grid.group_size if grouped else columns
    if not grouped:
        fixed_scale, fixed_zero = grid.qparams(W)  # [out, 1]
        scale, zero = fixed_scale[:, 0], fixed_zero[:, 0]
    elif static_groups:
        static_scale, static_zero = grid.qparams(W)  # [out, G] over the original column order

    perm = torch.arange(columns, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Hinv = inverse_hessian_factor(H, damp, layer_name)

    codes = torch.zeros_like(W)
    # Group of each position in the sweep, and the qparams of each group in the order created.
    sweep_group = torch.zeros(columns, dtype=torch.int64, device=W.device)
    scales, zeros = [], []
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if grouped and static_groups:
                g = int(perm[column]) // group_size
                scale, zero = static_scale[:, g], static_zero[:, g]
                sweep_group[column] = g
            elif grouped:
                if column % group_size == 0:
                    end = min(column + group_size, columns)
                    current = W1[:, i:end - i1]
                    if end > i2:
                        # the columns past this batch still lack the error of its columns so far
                        pending = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:column, i2:end]
                        current = torch.cat([current, pending], dim=1)
                    scale, zero = (t[:, 0] for t in grid.qparams(current))
                    scales.append(scale)
                    zeros.append(zero)
                sweep_group[column] = len(scales) - 1
            w = W1[:, i]
            q = grid.quantize_values(w, scale, zero)
            codes[:, column] = q
            err = (w - grid.dequantize_values(q, scale, zero)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inverse = torch.argsort(perm)
    codes = codes[:, inverse]
    # Per channel, sweep_group stays all zeros: one group.
    group_index = sweep_group[inverse].to(torch.int32)
    if not grouped:
        scale_table, zero_table = fixed_scale, fixed_zero
    elif static_groups:
        scale_table, zero_table = static_scale, static_zero
    else:
        scale_table, zero_table = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
    return QuantizedWeight(codes=codes.to(torch.uint8), scale=scale_table, zero=zero_table,
                           group_index=group_index, bits=grid.bits, group_size=grid.group_size)
