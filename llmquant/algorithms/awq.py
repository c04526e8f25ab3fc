"""AWQ (Lin et al., 2023): activation-aware per-channel scaling and clipping before rounding.

Input channels with large activations matter most; scaling them up (and the previous operation's
outputs down by the same factor) gives their weights finer relative resolution on the grid. Per
scaling group (e.g. input norm -> q, k, v), s = mean|x|^alpha (or the "duo" form
mean|x|^alpha / mean|w|^(1 - alpha)), normalized to geometric-mean-like scale, with alpha
searched on a grid to minimize the output error after quantization. Then, per linear and group,
the weight range is shrunk (clip search) where that lowers the output error. Rounding itself is
left to another algorithm: RTN (method "awq") or GPTQ (method "awq+gptq").

One departure from the reference (llm-awq / AutoAWQ), which runs the inspected module forward
per candidate: every error here is the exact output error of the group's linears,
tr(dW G dW^T) with G the inputs' Gram matrix over all calibration tokens, so the search needs no
forward passes and no token subsampling. Clip errors are per (output channel, group), as in the
reference.
"""
from __future__ import annotations

import torch

from ..grid import AffineGrid, QuantizedWeight
from .scaling import BlockTransform, ScalingGroup
from .statistics import InputGram


def candidate_scales(mean_abs_input: torch.Tensor, ratio: float, mean_abs_weight: torch.Tensor | None) -> torch.Tensor:
    if mean_abs_weight is None:
        scales = mean_abs_input.pow(ratio)
    else:
        scales = mean_abs_input.pow(ratio) / (mean_abs_weight.pow(1 - ratio) + 1e-4)
    scales = scales.clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def relative_weight_magnitude(weights: list[torch.Tensor], grid: AffineGrid) -> torch.Tensor:
    """Per input channel, the mean over output rows of |w| relative to its group's max (the duo term)."""
    rows = torch.cat([w.float() for w in weights])
    grouped, _ = grid.grouped(rows.abs())  # zero padding does not change a group's max
    relative = grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return relative.view(rows.shape[0], -1)[:, :rows.shape[1]].mean(dim=0)


def search_scales(weights: list[torch.Tensor], grids: list[AffineGrid], statistics: InputGram,
                  n_grid: int = 20, duo_scaling: bool = False) -> tuple[torch.Tensor, float, float, float]:
    """(scales, best ratio, error at ratio 0, best error) for linears sharing one input.

    The error is the summed output error of all the linears with weights quantized as
    Q(W diag(s)) diag(s)^-1; ratio 0 (s = 1) is plain rounding, so the result is never worse
    than that on the calibration data.
    """
    weights = [w.detach() for w in weights]
    mean_abs_input = statistics.channel_abs_mean()
    mean_abs_weight = relative_weight_magnitude(weights, grids[0]) if duo_scaling else None
    best = (torch.ones_like(mean_abs_input), 0.0, float("inf"))
    baseline = float("inf")
    for step in range(n_grid):
        ratio = step / n_grid
        scales = candidate_scales(mean_abs_input, ratio, mean_abs_weight)
        error = 0.0
        for weight, grid in zip(weights, grids):
            w = weight.float()
            approximation = grid.fake_quantize(w * scales) / scales
            error += statistics.output_energy(w - approximation)
        if step == 0:
            baseline = error
        if error < best[2]:
            best = (scales, ratio, error)
    return best[0], best[1], baseline, best[2]


def search_clip_ranges(weight: torch.Tensor, grid: AffineGrid, gram: torch.Tensor, n_grid: int = 20,
                       max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel and group, the range [min, max] (the group's own range shrunk by a
    factor 1, 1 - 1/n_grid, ... down to 1 - max_shrink) whose clipped, rounded weights give the
    least output error of that group's part of the matmul."""
    w, valid = grid.grouped(weight.float())
    groups, width = w.shape[1], w.shape[2]
    pad = groups * width - weight.shape[1]
    padded_gram = torch.nn.functional.pad(gram.float(), (0, pad, 0, pad))
    diagonal_blocks = torch.stack([padded_gram[g * width:(g + 1) * width, g * width:(g + 1) * width]
                                   for g in range(groups)])  # [groups, width, width]
    xmin, xmax = grid.group_ranges(w, valid)
    best_error = torch.full_like(xmin, torch.inf)
    best_min, best_max = xmin.clone(), xmax.clone()
    for step in range(int(max_shrink * n_grid) + 1):
        shrink = 1 - step / n_grid
        low, high = shrink * xmin, shrink * xmax
        scale, zero = grid.qparams_from_range(low, high)
        clipped = torch.maximum(torch.minimum(w, high[..., None]), low[..., None])
        delta = w - grid.fake_quantize_values(clipped, scale[..., None], zero[..., None])
        # delta_og^T G_gg delta_og for each output channel o and group g
        error = (torch.einsum("ogi,gij->ogj", delta, diagonal_blocks) * delta).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_min = torch.where(better, low, best_min)
        best_max = torch.where(better, high, best_max)
    return best_min, best_max


def clamp_to_ranges(weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, grid: AffineGrid) -> torch.Tensor:
    columns_group = grid.group_index(weight.shape[1], weight.device).long()
    return torch.maximum(torch.minimum(weight, high[:, columns_group].to(weight)), low[:, columns_group].to(weight))


class AWQ:
    """AWQ scaling and clipping per block, then `rounding` (RTN or GPTQ) per linear."""

    needs_calibration = True

    def __init__(self, rounding, n_grid: int = 20, duo_scaling: bool = False, clip: bool = True,
                 max_shrink: float = 0.5):
        self.rounding = rounding
        self.name = "awq" if rounding.name == "rtn" else f"awq+{rounding.name}"
        self.n_grid = n_grid
        self.duo_scaling = duo_scaling
        self.clip = clip
        self.max_shrink = max_shrink

    @property
    def statistics_options(self) -> dict:
        return getattr(self.rounding, "statistics_options", {})

    @torch.no_grad()
    def transform_block(self, groups: list[ScalingGroup], grid_for, no_clip: set[str]) -> BlockTransform:
        """Search every group's scales on the block's current weights, fold them all, then clip.

        grid_for(name, linear) gives each linear's grid; no_clip: full names left unclipped.
        """
        outcome = BlockTransform()
        chosen = []
        for group in groups:
            names = group.quantized
            weights = [group.linears[n].weight for n in names]
            grids = [grid_for(n, group.linears[n]) for n in names]
            scales, ratio, baseline, error = search_scales(weights, grids, group.statistics, self.n_grid,
                                                           self.duo_scaling)
            chosen.append(scales)
            outcome.records.append({"previous": group.name, "linears": list(names), "ratio": ratio,
                                    "output_error_unscaled": baseline, "output_error_scaled": error})
        # All scales are searched on the unscaled block first (as the reference does); a linear
        # that is both scaled (columns) and previous (rows) takes both, which commute.
        for group, scales in zip(groups, chosen):
            group.fold(scales)
        for group in groups:
            for name in group.quantized:
                linear = group.linears[name]
                outcome.reference_weights[name] = linear.weight.detach().clone()
                if not self.clip or name in no_clip:
                    continue
                grid = grid_for(name, linear)
                low, high = search_clip_ranges(linear.weight, grid, group.statistics.gram, self.n_grid,
                                               self.max_shrink)
                linear.weight.copy_(clamp_to_ranges(linear.weight, low, high, grid))
        return outcome

    def quantize(self, weight: torch.Tensor, grid: AffineGrid, statistics: InputGram | None,
                 layer_name: str = "layer") -> QuantizedWeight:
        return self.rounding.quantize(weight, grid, statistics, layer_name)
