"""Q4_0, Q4_1 and Q5_0 blocks (32 values each) with importance-weighted scales.

Without an importance matrix the gguf package's own quantizers write these (the llama.cpp reference
rounding); with one, the scale search of fit.py chooses each block's factors. Layouts (llama.cpp's
ggml-common.h): Q4_0 = d fp16 + 16 bytes, value j in the low nibble of byte j and value j + 16 in
the high nibble, code = q + 8; Q5_0 = d fp16 + 4 bytes of fifth bits (bit j of a little-endian
uint32 for value j) + the same 16 nibble bytes, code = q + 16; Q4_1 = d fp16 + m fp16 + nibbles,
value = d * code + m.
"""
from __future__ import annotations

import numpy as np

from .fit import block_weights, fit_symmetric, fit_with_minimum

BLOCK = 32


def _nibbles(codes: np.ndarray) -> np.ndarray:
    return (codes[:, :16] & 0x0F) | ((codes[:, 16:] & 0x0F) << 4)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _symmetric_codes(x, importance, rows, nmax):
    d = fit_symmetric(x, block_weights(importance, rows, x.shape), nmax).astype(np.float16)
    d32 = d.astype(np.float32)
    inverse = np.where(d32 != 0, 1 / np.where(d32 != 0, d32, 1), 0)
    codes = (np.clip(np.round(x * inverse[:, None]), -nmax, nmax - 1) + nmax).astype(np.uint8)
    return d, codes


def quantize_q4_0(values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    rows = values.shape[0]
    x = values.astype(np.float32).reshape(-1, BLOCK)
    d, codes = _symmetric_codes(x, importance, rows, 8)
    return np.concatenate([_fp16_bytes(d), _nibbles(codes)], axis=1).reshape(rows, -1)


def quantize_q5_0(values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    rows = values.shape[0]
    x = values.astype(np.float32).reshape(-1, BLOCK)
    d, codes = _symmetric_codes(x, importance, rows, 16)
    fifth = ((codes >> 4).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    high_bits = fifth.astype("<u4").reshape(-1, 1).view(np.uint8)
    return np.concatenate([_fp16_bytes(d), high_bits, _nibbles(codes)], axis=1).reshape(rows, -1)


def quantize_q4_1(values: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    rows = values.shape[0]
    x = values.astype(np.float32).reshape(-1, BLOCK)
    scale, minimum = fit_with_minimum(x, block_weights(importance, rows, x.shape), 15, offset_nonpositive=False)
    d, m = scale.astype(np.float16), (-minimum).astype(np.float16)
    d32 = d.astype(np.float32)
    inverse = np.where(d32 > 0, 1 / np.where(d32 > 0, d32, 1), 0)
    codes = np.clip(np.round((x - m.astype(np.float32)[:, None]) * inverse[:, None]), 0, 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes)], axis=1).reshape(rows, -1)
