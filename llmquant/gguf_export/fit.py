"""Importance-weighted scale searches for GGUF blocks, the numerics llama.cpp's quantizers use when
given an importance matrix (make_qx_quants for symmetric blocks, make_qkx2_quants for blocks with a
minimum). Pure functions of the values x [..., n] and non-negative weights of the same shape."""
from __future__ import annotations

import numpy as np


def _weighted_least_squares(x, q, weights):
    """(a, b) minimizing sum w (a q + b - x)^2 per block, with a None where the fit is degenerate."""
    sw, sq, sqq = weights.sum(-1), (weights * q).sum(-1), (weights * q * q).sum(-1)
    sx, sqx = (weights * x).sum(-1), (weights * q * x).sum(-1)
    det = sw * sqq - sq * sq
    safe = np.where(det > 0, det, 1)
    return det > 0, (sw * sqx - sq * sx) / safe, (sqq * sx - sq * sqx) / safe


def fit_with_minimum(x: np.ndarray, weights: np.ndarray, levels: int, offset_nonpositive: bool,
                     steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(scale, minimum) per block so that x ~ scale * q - minimum with codes q in 0..levels.
    Candidates shrink the [low, high] range step by step; each candidate's codes get the weighted
    least-squares (scale, offset), and the lowest weighted error wins. offset_nonpositive: the
    format stores the minimum unsigned (Q4_K), so the offset -minimum may not exceed 0."""
    low = x.min(axis=-1)
    if offset_nonpositive:
        low = np.minimum(low, 0)
    high = x.max(axis=-1)
    spread = high > low
    best_scale = np.where(spread, (high - low) / levels, 1.0)
    best_min = -low
    best_error = np.full(low.shape, np.inf, dtype=np.float64)
    for step in range(steps + 1):
        scale = np.where(spread, (high - low) * (1 - 0.2 * step / steps) / levels, 1.0)
        q = np.clip(np.round((x - low[..., None]) / scale[..., None]), 0, levels)
        ok, a, b = _weighted_least_squares(x, q, weights)
        a = np.maximum(np.where(ok, a, scale), 1e-12)
        b = np.where(ok, b, low)
        if offset_nonpositive:
            b = np.minimum(b, 0)
        error = (weights * (a[..., None] * q + b[..., None] - x) ** 2).sum(-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, a, best_scale)
        best_min = np.where(better, -b, best_min)
    return best_scale, best_min


def fit_symmetric(x: np.ndarray, weights: np.ndarray, nmax: int, steps: int = 9) -> np.ndarray:
    """Scale d per block so that x ~ d * q with codes q in -nmax..nmax-1 (Q4_0: 8, Q5_0: 16).
    As llama.cpp: the signed value of largest magnitude fixes the sign; candidate scales around
    -max / nmax each give codes, then the weighted least-squares d for those codes; lowest error wins."""
    index = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, index[..., None], axis=-1)[..., 0]
    best_d = peak / -nmax
    best_error = np.full(peak.shape, np.inf, dtype=np.float64)
    nonzero = peak != 0
    for step in range(-steps, steps + 1):
        inverse = np.where(nonzero, -(nmax + 0.1 * step) / np.where(nonzero, peak, 1), 0)
        q = np.clip(np.round(x * inverse[..., None]), -nmax, nmax - 1)
        sqq = (weights * q * q).sum(-1)
        d = np.where(sqq > 0, (weights * q * x).sum(-1) / np.where(sqq > 0, sqq, 1), 0)
        error = (weights * (d[..., None] * q - x) ** 2).sum(-1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_d = np.where(better, d, best_d)
    return best_d


def block_weights(importance: np.ndarray | None, rows: int, shape) -> np.ndarray:
    """Per-value weights laid out like the blocks of a [rows, cols] matrix reshaped to `shape`:
    the imatrix (one weight per input column) repeated for every row, or ones without one."""
    if importance is None:
        return np.ones(shape, dtype=np.float32)
    return np.tile(importance.astype(np.float32), rows).reshape(shape) + 1e-12
