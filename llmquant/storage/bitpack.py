"""Packing small unsigned integers into int32 words as one little-endian bit stream.

Value j of a run sits at bit offset bits * j, low bits first, spilling into the next word when
it straddles a boundary. For 2, 4 and 8 bits this is the familiar "value k of a word at
shift bits * k"; for 3 bits it is exactly the 32-values-in-3-words layout of GPTQ / AutoGPTQ.
Used by checkpoint formats and by the reference matmul ops alike.
"""
from __future__ import annotations

from math import gcd

import torch


def run_shape(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest run that fills whole int32 words."""
    g = gcd(32, bits)
    return 32 // g, bits // g


def _layout(bits: int):
    values, _ = run_shape(bits)
    for j in range(values):
        offset = bits * j
        yield j, offset // 32, offset % 32


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along `dim` into int32 words (the packed dim shrinks by 32 / bits)."""
    run_values, run_words = run_shape(bits)
    v = values.movedim(dim, 0).to(torch.int64)
    n = v.shape[0]
    if n % run_values:
        raise ValueError(f"cannot pack {n} values of {bits} bits: need a multiple of {run_values}")
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    v = v.reshape(n // run_values, run_values, *v.shape[1:])
    words = torch.zeros(n // run_values, run_words, *v.shape[2:], dtype=torch.int64, device=v.device)
    mask = 0xFFFFFFFF
    for j, word, shift in _layout(bits):
        words[:, word] |= (v[:, j] << shift) & mask
        if shift + bits > 32:
            words[:, word + 1] |= v[:, j] >> (32 - shift)
    words = words.reshape(-1, *v.shape[2:])
    # Reinterpret the unsigned 32-bit pattern as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words along `dim` to int32 values in [0, 2**bits)."""
    run_values, run_words = run_shape(bits)
    if run_words == 1:  # 2, 4, 8 bits: whole values per word, one vectorized shift (the hot path of dequantization)
        w = words.movedim(dim, 0).to(torch.int32)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device).view(1, -1, *([1] * (w.dim() - 1)))
        # an arithmetic shift drags the sign bit down; the mask keeps only the value's own bits
        values = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
        return values.reshape(-1, *w.shape[1:]).movedim(0, dim).contiguous()
    w = words.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    n = w.shape[0]
    if n % run_words:
        raise ValueError(f"{n} words do not hold whole runs of {bits}-bit values")
    w = w.reshape(n // run_words, run_words, *w.shape[1:])
    mask = 2**bits - 1
    out = torch.empty(n // run_words, run_values, *w.shape[2:], dtype=torch.int64, device=w.device)
    for j, word, shift in _layout(bits):
        value = w[:, word] >> shift
        if shift + bits > 32:
            value = value | (w[:, word + 1] << (32 - shift))
        out[:, j] = value & mask
    return out.reshape(-1, *w.shape[2:]).to(torch.int32).movedim(0, dim).contiguous()
