"""Q4_K, llama.cpp's 4-bit "k-quant" (the gguf package reads it but cannot write it).

A super-block of 256 values holds 8 sub-blocks of 32: w = d * sc[j] * q - dmin * m[j], with 4-bit
codes q, 6-bit sub-block scales sc and mins m, and fp16 super-block factors d and dmin.
Layout of one 144-byte block: d (fp16), dmin (fp16), 12 bytes of packed sc / m, 128 bytes of codes
(chunk c of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high ones).
Each sub-block's (scale, min) comes from fit.fit_with_minimum (optionally importance-weighted).
"""
from __future__ import annotations

import numpy as np

from .fit import block_weights, fit_with_minimum

QK_K, SUB = 256, 32


def quantize_q4_k(values: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """uint8 [rows, cols / 256 * 144] Q4_K blocks of a float [rows, cols] matrix (cols % 256 == 0).
    importance: per-column weights [cols] (an imatrix: mean x_j^2 of the layer's inputs) or None."""
    rows, cols = values.shape
    if cols % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {cols}")
    x = values.astype(np.float32).reshape(-1, 8, SUB)
    scale, minimum = fit_with_minimum(x, block_weights(importance, rows, x.shape), 15, offset_nonpositive=True)
    d = (scale.max(axis=-1) / 63).astype(np.float16)
    dmin = (minimum.max(axis=-1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d32 > 0, d32, 1)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(minimum / np.where(dmin32 > 0, dmin32, 1)[:, None]), 0, 63).astype(np.uint8)
    eff_scale = d32[:, None] * sc
    eff_min = dmin32[:, None] * m
    q = np.clip(np.round((x + eff_min[..., None]) / np.where(eff_scale > 0, eff_scale, 1)[..., None]), 0, 15)
    q = q.astype(np.uint8)
    packed_scales = np.empty((x.shape[0], 12), dtype=np.uint8)
    packed_scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed_scales[:, 4:8] = (m[:, 0:4] & 0x3F) | ((m[:, 4:8] >> 4) << 6)
    packed_scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    codes = q.reshape(-1, 4, 2, SUB)
    qs = (codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed_scales, qs],
                            axis=1)
    return blocks.reshape(rows, cols // QK_K * 144)
