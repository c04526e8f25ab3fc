"""SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights, then W8A8.

Per scaling group (input norm -> q/k/v, MLP norm -> gate/up, and linear -> linear pairs where
the architecture map has them), s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over the group's
quantized linears (one kept in floating point is rescaled but does not shape s), folded into the previous operation, so X/s is easier to quantize and W s takes the
difficulty. alpha is given, or "auto": per group, the alpha on a grid that minimizes the
linears' output error under W8A8 rounding on a sample of real input rows (static activations
are scored with a min-max per-tensor scale during this search).
"""
from __future__ import annotations

import torch

from ..grid import PER_CHANNEL, AffineGrid, QuantizedWeight
from ..grid.activations import fake_quantize
from .scaling import BlockTransform, ScalingGroup
from .statistics import InputGram
from .w8a8 import W8A8

AUTO = "auto"
ALPHA_GRID = tuple(i / 20 for i in range(21))
# Input rows kept per scaling group for the auto search (the first calibration windows' tokens).
SEARCH_ROWS = 2048


def smoothing_scales(channel_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    weight_max = torch.cat([w.detach().float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (channel_abs_max.float().pow(alpha) / weight_max.pow(1 - alpha)).clamp(min=1e-5)


def w8a8_output_error(inputs: torch.Tensor, weights: list[torch.Tensor], grids: list[AffineGrid],
                      scales: torch.Tensor, static: bool, references: list[torch.Tensor] | None = None) -> float:
    """Sum over the linears of ||X W^T - Q(X / s) Q(W s)^T||^2 on the sample rows X.
    references: the X W^T of each linear, when the caller has them already (they do not depend on s)."""
    smoothed = inputs / scales
    input_scale = (smoothed.abs().amax() / 127).reshape(1) if static else None
    quantized_inputs = fake_quantize(smoothed, input_scale)
    error = 0.0
    for i, (weight, grid) in enumerate(zip(weights, grids)):
        w = weight.detach().float()
        reference = references[i] if references is not None else inputs @ w.t()
        difference = torch.addmm(reference, quantized_inputs, grid.fake_quantize(w * scales).t(), alpha=-1)
        error += float(difference.square().sum())
    return error


class SmoothQuant:
    name = "smoothquant"
    needs_calibration = True

    def __init__(self, alpha: float | str = 0.5, rounding: W8A8 | None = None):
        self.alpha = alpha
        self.rounding = rounding or W8A8()

    @property
    def statistics_options(self) -> dict:
        return self.rounding.statistics_options

    @property
    def transform_statistics_options(self) -> dict:
        # the scales need max |x| per channel (and, for the search, real rows), not the Gram matrix
        return {"gram": False, **({"keep_rows": SEARCH_ROWS} if self.alpha == AUTO else {})}

    @torch.no_grad()
    def transform_block(self, groups: list[ScalingGroup], grid_for, no_clip: set[str]) -> BlockTransform:
        outcome = BlockTransform()
        for group in groups:
            # the quantized linears shape the scales (searched and applied alike); all are rescaled
            weights = [group.linears[n].weight for n in group.quantized]
            channel_max = group.statistics.channel_abs_max
            alpha = self.alpha if self.alpha != AUTO else self._search_alpha(group, weights, grid_for)
            scales = smoothing_scales(channel_max, weights, alpha)
            outcome.records.append({
                "previous": group.name, "linears": list(group.linears), "alpha": alpha,
                "input_abs_max_before": float(channel_max.max()),
                "input_abs_max_after": float((channel_max / scales).max()),
            })
            group.fold(scales)
        return outcome

    def _search_alpha(self, group: ScalingGroup, weights: list[torch.Tensor], grid_for) -> float:
        inputs = group.statistics.kept_rows().float()
        grids = [grid_for(n, group.linears[n]) for n in group.quantized]
        weights = [w.detach().float() for w in weights]
        if all(grid == grids[0] and grid.group_size == PER_CHANNEL for grid in grids):
            # per output channel, rows round alike whichever linear they belong to: one matmul for all
            weights, grids = [torch.cat(weights)], grids[:1]
        references = [inputs @ w.t() for w in weights]  # the same for every alpha
        errors = {alpha: w8a8_output_error(inputs, weights, grids,
                                           smoothing_scales(group.statistics.channel_abs_max, weights, alpha),
                                           self.rounding.static, references)
                  for alpha in ALPHA_GRID}
        return min(errors, key=errors.get)

    def quantize(self, weight: torch.Tensor, grid: AffineGrid, statistics: InputGram | None,
                 layer_name: str = "layer") -> QuantizedWeight:
        return self.rounding.quantize(weight, grid, statistics, layer_name)
