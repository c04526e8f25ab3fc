"""codebook4_linear: x @ W^T for bitsandbytes-packed 4-bit codebook weights (NF4 / FP4; the layout of
llmquant.formats.bitsandbytes).

Numerics: W = table[code] * absmax per block of `blocksize` weights (row-major over [out, in]) in
fp32, absmax first dequantized from 8 bits under double quantization (nested table * nested absmax
+ offset); cast once to x's dtype, then x @ W^T (+ bias) in x's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...grid.codebook import dequantize_nested_absmax, scale_blocks
from .registry import call, declare


def dequantize_4bit(packed, absmax, table, blocksize: int, shape: tuple[int, int]) -> torch.Tensor:
    """fp32 [out, in] weight from bitsandbytes 4-bit tensors (see llmquant.formats.bitsandbytes);
    absmax is the fp32 per-block scale (already dequantized under double quantization)."""
    count = shape[0] * shape[1]
    # one lookup per byte: byte b holds (table[b >> 4], table[b & 15])
    table = table.float()
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)
    values = F.embedding(packed.reshape(-1).long(), pairs).reshape(-1)[:count]
    return scale_blocks(values, absmax, blocksize).view(shape)


def codebook4_linear(x, packed, absmax, table, nested, blocksize: int, shape: tuple[int, int], bias):
    """x @ W^T for an NF4 / FP4 weight. nested: (nested_absmax, nested_table, offset, nested_blocksize)
    when absmax is double-quantized (uint8), else None."""
    return call("codebook4_linear", x, *codebook4_arguments(packed, absmax, table, nested, blocksize, shape, bias))


def codebook4_arguments(packed, absmax, table, nested, blocksize: int, shape: tuple[int, int], bias) -> tuple:
    """The op's arguments after x, with `nested` spread into its four."""
    nested_absmax, nested_table, offset, nested_blocksize = nested if nested is not None else (None, None, 0.0, 0)
    return (packed, absmax, table, nested_absmax, nested_table, float(offset), int(nested_blocksize), blocksize,
            list(shape), bias)


@declare("codebook4_linear", output_features=lambda packed, absmax, table, *rest: rest[-2][0])
def codebook4_linear_reference(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                               nested_absmax: Optional[torch.Tensor], nested_table: Optional[torch.Tensor],
                               nested_offset: float, nested_blocksize: int, blocksize: int, shape: list[int],
                               bias: Optional[torch.Tensor]) -> torch.Tensor:
    if nested_absmax is not None:
        absmax = dequantize_nested_absmax(absmax, nested_absmax, nested_table, nested_offset, nested_blocksize)
    weight = dequantize_4bit(packed, absmax, table, blocksize, shape).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
