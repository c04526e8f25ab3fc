"""Observers: choose the clipping threshold of a static, symmetric, per-tensor activation grid
from calibration data, so that any algorithm can fix an input scale (scale = threshold / qmax).

All observers read one AbsHistogram of |x| streamed over the calibration batches:
- minmax: the largest |x| seen (exact, tracked beside the histogram);
- percentile: the value below which `percentile` % of |x| lies;
- mse: the threshold (among 200 fractions of the max) minimizing the expected squared
  quantization error (rounding inside the range, saturation outside), evaluated on the histogram;
- kl: TensorRT's entropy calibration: the threshold whose quantized distribution (the clipped
  histogram merged into qmax + 1 levels and spread back) is closest in KL divergence to the
  clipped reference distribution (outliers folded into its last bin).
"""
from __future__ import annotations

import math

import torch

INT8_QMAX = 127


class AbsHistogram:
    """Histogram of |x| over [0, range) with a fixed number of bins; when a batch exceeds the
    range, the range doubles and adjacent bin pairs merge, so no pass over old data is needed."""

    def __init__(self, bins: int = 2048):
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.range = 0.0
        self.absmax = 0.0

    def add(self, x: torch.Tensor) -> None:
        magnitude = x.detach().abs().float().reshape(-1)
        if magnitude.numel() == 0:
            return
        batch_max = float(magnitude.max())
        self.absmax = max(self.absmax, batch_max)
        if self.range == 0.0:
            self.range = batch_max if batch_max > 0 else 1.0
        while batch_max >= self.range:
            self.counts = torch.cat([self.counts.view(-1, 2).sum(dim=1), torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.range *= 2
        self.counts += torch.histc(magnitude, bins=self.bins, min=0.0, max=self.range).double().cpu()

    @property
    def bin_width(self) -> float:
        return self.range / self.bins


def minmax_threshold(histogram: AbsHistogram, qmax: int = INT8_QMAX) -> float:
    return histogram.absmax


def percentile_threshold(histogram: AbsHistogram, percentile: float = 99.99, qmax: int = INT8_QMAX) -> float:
    cumulative = torch.cumsum(histogram.counts, 0)
    target = cumulative[-1] * percentile / 100
    index = int(torch.searchsorted(cumulative, target))
    index = min(index, histogram.bins - 1)
    below = float(cumulative[index - 1]) if index > 0 else 0.0
    inside = float(histogram.counts[index])
    fraction = (float(target) - below) / inside if inside > 0 else 1.0
    return min((index + fraction) * histogram.bin_width, histogram.absmax)


# Points per histogram bin at which the MSE observer evaluates rounding error: values are taken as
# spread evenly inside a bin, so steps finer than a bin are scored correctly.
POINTS_PER_BIN = 16


def expected_squared_errors(histogram: AbsHistogram, thresholds: torch.Tensor, qmax: int = INT8_QMAX) -> torch.Tensor:
    """Mean squared error of quantizing the histogram's values on a grid of step threshold / qmax
    that saturates at +-threshold (values spread evenly within each bin, capped at absmax), for
    each of `thresholds` at once."""
    offsets = (torch.arange(POINTS_PER_BIN, dtype=torch.float64) + 0.5) / POINTS_PER_BIN
    points = ((torch.arange(histogram.bins, dtype=torch.float64)[:, None] + offsets) * histogram.bin_width)
    points = points.clamp(max=histogram.absmax)
    errors = []
    for chunk in thresholds.to(torch.float64).split(32):  # [32, bins, points] at a time, in place
        step = (chunk / qmax)[:, None, None]
        error = torch.div(points, step).round_().clamp_(max=qmax).mul_(step).sub_(points).square_()
        errors.append((histogram.counts * error.mean(dim=2)).sum(dim=1) / histogram.counts.sum())
    return torch.cat(errors)


def expected_squared_error(histogram: AbsHistogram, threshold: float, qmax: int = INT8_QMAX) -> float:
    return float(expected_squared_errors(histogram, torch.tensor([threshold], dtype=torch.float64), qmax)[0])


def mse_threshold(histogram: AbsHistogram, qmax: int = INT8_QMAX, candidates: int = 200) -> float:
    """The threshold among absmax * i / candidates (i = candidates .. 1) with the least expected
    error; the largest of equal ones."""
    thresholds = [histogram.absmax * i / candidates for i in range(candidates, 0, -1)]
    errors = expected_squared_errors(histogram, torch.tensor(thresholds, dtype=torch.float64), qmax)
    return thresholds[int(torch.argmin(errors))]  # argmin: the first of equal minima


def kl_threshold(histogram: AbsHistogram, qmax: int = INT8_QMAX) -> float:
    """TensorRT entropy calibration over thresholds at bin edges i = levels .. bins."""
    counts = histogram.counts
    levels = qmax + 1
    last = int(math.ceil(histogram.absmax / histogram.bin_width))
    last = min(max(last, levels), histogram.bins)
    best_i, best_divergence = last, math.inf
    for i in range(levels, last + 1):
        reference = counts[:i].clone()
        reference[i - 1] += counts[i:].sum()
        # Merge the i clipped bins into `levels` quantization bins (bin j -> level j * levels // i),
        # then spread each level's mass evenly over its non-empty source bins.
        level_of_bin = torch.arange(i) * levels // i
        clipped = counts[:i]
        nonzero = (clipped > 0).double()
        level_mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, level_of_bin, clipped)
        level_support = torch.zeros(levels, dtype=torch.float64).index_add_(0, level_of_bin, nonzero)
        expanded = torch.where(nonzero > 0, level_mass[level_of_bin] / level_support[level_of_bin].clamp(min=1), 0.0)
        divergence = _kl_divergence(reference, expanded)
        if divergence < best_divergence:
            best_i, best_divergence = i, divergence
    return min(best_i * histogram.bin_width, histogram.absmax)


def _kl_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    p = p / p.sum()
    q = q / q.sum().clamp(min=1e-300)
    support = p > 0
    if bool((q[support] == 0).any()):
        return math.inf
    return float((p[support] * torch.log(p[support] / q[support])).sum())


OBSERVERS = {
    "minmax": minmax_threshold,
    "percentile": percentile_threshold,
    "mse": mse_threshold,
    "kl": kl_threshold,
}


def observed_scale(histogram: AbsHistogram, observer: str, qmax: int = INT8_QMAX, **options) -> float:
    """Static per-tensor scale threshold / qmax from the named observer."""
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; available: {', '.join(OBSERVERS)}")
    if histogram.absmax == 0.0:
        return 1.0 / qmax
    return OBSERVERS[observer](histogram, qmax=qmax, **options) / qmax
