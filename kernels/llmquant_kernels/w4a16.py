"""Weight-only quantized GEMM: y = x @ dequant(W) (+ bias), x fp16 / bf16 / fp32, fp32 accumulation.

One kernel serves two packed layouts (`layout`):
- "gptq": qweight int32 [K * bits / 32, N] packed along K as one little-endian bit stream (value k at
  bit offset bits * k; 3-bit values straddle words), qzeros int32 [G, N * bits / 32] packed the same
  way along N, scales [G, N], g_idx int32 [K] (any group size, act-order, partial last group);
  w[k, n] = (q - (z + zero_offset)) * s with zero_offset 1 for GPTQ v1 checkpoints, 0 for v2.
- "awq": 4-bit, qweight int32 [K, N / 8] and qzeros int32 [G, N / 8] packed along N with AWQ's
  interleave (nibble p of a word holds column 8 * word + [0, 2, 4, 6, 1, 3, 5, 7][p]), scales [G, N],
  group of k = k // group_size; w[k, n] = (q - z) * s.
Small M (decode) splits K across programs and adds the partial sums atomically into an fp32 buffer;
large M runs plain output tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import dot_fp32, output_tile, run_tiled, store_tile, tile_offsets

LAYOUTS = {"gptq": 0, "awq": 1}


@triton.jit
def stream_word_offset(index, lane, word_stride, lane_stride, BITS: tl.constexpr):
    """(64-bit offset of the word holding value `index` of stream `lane`, the value's bit shift in it):
    word w of stream `lane` sits at w * word_stride + lane * lane_stride."""
    bit = index.to(tl.int64) * BITS
    return (bit // 32) * word_stride + lane.to(tl.int64) * lane_stride, (bit % 32).to(tl.uint32)


@triton.jit
def _unpack_stream(words_ptr, index, lane, word_stride, lane_stride, mask, BITS: tl.constexpr):
    """Value `index` of the little-endian bit streams of int32 words (GPTQ qweight: streams down K, one
    per column; qzeros: streams along N, one per group). 3-bit values straddle two words."""
    offset, shift = stream_word_offset(index, lane, word_stride, lane_stride, BITS)
    address = words_ptr + offset
    value = tl.load(address, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        spill = (shift + BITS) > 32
        high = tl.load(address + word_stride, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        value = value | (high << tl.where(spill, 32 - shift, 0))
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _awq_nibble(words_ptr, row, column, row_stride, mask):
    # position of column c within its word: the inverse of the pack order [0, 2, 4, 6, 1, 3, 5, 7]
    position = (column % 2) * 4 + (column % 8) // 2
    word = tl.load(words_ptr + row.to(tl.int64) * row_stride + column // 8, mask=mask, other=0).to(tl.uint32,
                                                                                                  bitcast=True)
    return ((word >> (position * 4).to(tl.uint32)) & 0xF).to(tl.int32)


@triton.jit
def w4a16_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, M, N, K, group_size, stride_xm,
                 out_ptr, stride_om,
                 BITS: tl.constexpr, LAYOUT: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr, IEEE_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_tile in range(tl.program_id(2), tl.cdiv(K, BLOCK_K), SPLIT_K):
        rk = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(x_ptr + tile_offsets(rm, stride_xm, rk), mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        tile_mask = k_mask[:, None] & n_mask[None, :]
        if LAYOUT == 0:
            q = _unpack_stream(qweight_ptr, rk[:, None], rn[None, :], N, 1, tile_mask, BITS)
            group = tl.load(g_idx_ptr + rk, mask=k_mask, other=0)
            zero = _unpack_stream(qzeros_ptr, rn[None, :], group[:, None], 1, N * BITS // 32, tile_mask, BITS)
        else:
            q = _awq_nibble(qweight_ptr, rk[:, None], rn[None, :], N // 8, tile_mask)
            group = rk // group_size
            zero = _awq_nibble(qzeros_ptr, group[:, None], rn[None, :], N // 8, tile_mask)
        scale = tl.load(scales_ptr + tile_offsets(group, N, rn), mask=tile_mask, other=0.0)
        w = ((q - (zero + ZERO_OFFSET)).to(tl.float32) * scale.to(tl.float32)).to(a.dtype)
        acc = dot_fp32(acc, a, w, IEEE_FP32)
    store_tile(acc, out_ptr, stride_om, bias_ptr, rm, rn, m_mask, n_mask, HAS_BIAS, SPLIT_K)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, layout: str,
                 zero_offset: int = 1, group_size: int = 0, config: dict | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W (the dequantized [K, N] weight) + bias, in x's dtype."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if layout == "awq" and (bits != 4 or group_size < 1):
        raise ValueError("the awq layout is 4-bit with a positive group_size")
    if layout == "gptq" and g_idx is None:
        raise ValueError("the gptq layout needs g_idx")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = rows.shape
    N = scales.shape[1]
    args = (rows, qweight, qzeros, scales, g_idx if g_idx is not None else qweight,
            bias if bias is not None else scales, M, N, K, max(group_size, 1), rows.stride(0))

    y = run_tiled(w4a16_kernel, args, M, N, K, x, x.dtype, config, BITS=bits, LAYOUT=LAYOUTS[layout],
                  ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None, IEEE_FP32=rows.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], N)


__all__ = ["w4a16_kernel", "w4a16_matmul"]
