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
large M runs plain output tiles. At M <= 8 both layouts run a GEMV instead (w4a16_gemv_kernel), as
AutoAWQ's GEMV does at batch 1: no tl.dot, whose 16-row tiles would be mostly padding there; each
program streams its slab of packed words once, unpacks them in registers and accumulates in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import GEMV_MAX_M, KernelSpec, out_pointer, pointer
from ._tiles import dot_fp32, output_tile, run_tiled, store_tile, tile_offsets

LAYOUTS = {"gptq": 0, "awq": 1}
PATHS = ("auto", "gemv", "tiled")


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


@triton.jit
def _packed_value(w0, w1, w2, j, BITS: tl.constexpr):
    """Value j of a run packed little-endian from uint32 word w0 on: 32 / BITS values in one word,
    or at 3 bits 32 values in the words w0, w1, w2 (values 10 and 21 straddle two). j is a loop
    index, not a constant: an unrolled run holds every value's loads live at once and spills."""
    bit = j * BITS
    shift = (bit % 32).to(tl.uint32)
    if BITS == 3:
        word = bit // 32
        value = tl.where(word == 0, w0, tl.where(word == 1, w1, w2)) >> shift
        spill = shift + BITS > 32
        high = tl.where(word == 0, w1, w2) << tl.where(spill, 32 - shift, 0)
        value = value | tl.where(spill, high, 0)
    else:
        value = w0 >> shift
    return (value & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _run_words(qweight_ptr, run, rn, n_mask, N, K, BITS: tl.constexpr, LAYOUT: tl.constexpr):
    """(w0, w1, w2): the uint32 words of each run of the GPTQ layout, loaded once per step ([RUNS, BLOCK_N];
    one word, three at 3 bits). The AWQ layout has none to load here: a run's values lie in RUN rows of
    the weight, which _run_value reads a row at a time."""
    WORDS: tl.constexpr = 3 if BITS == 3 else 1
    if LAYOUT == 0:
        total_words = tl.cdiv(K * BITS, 32)
        word_row = run * WORDS
        words = qweight_ptr + tile_offsets(word_row, N, rn)
        w0 = tl.load(words, mask=(word_row < total_words)[:, None] & n_mask[None, :], other=0)
        w0 = w0.to(tl.uint32, bitcast=True)
        if WORDS == 3:
            w1 = tl.load(words + N, mask=(word_row + 1 < total_words)[:, None] & n_mask[None, :], other=0)
            w1 = w1.to(tl.uint32, bitcast=True)
            w2 = tl.load(words + 2 * N, mask=(word_row + 2 < total_words)[:, None] & n_mask[None, :], other=0)
            w2 = w2.to(tl.uint32, bitcast=True)
        else:
            w1 = w0
            w2 = w0
    else:
        w0 = tl.zeros((run.shape[0], rn.shape[0]), dtype=tl.uint32)
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _run_value(qweight_ptr, w0, w1, w2, j, k, rn, N, mask, BITS: tl.constexpr, LAYOUT: tl.constexpr):
    """Quantized value j of every run ([RUNS, BLOCK_N]; k: its row of the weight): shifted out of the
    run's words (GPTQ), or read from row k's words, each shared by eight neighbouring columns (AWQ)."""
    if LAYOUT == 0:
        return _packed_value(w0, w1, w2, j, BITS)
    return _awq_nibble(qweight_ptr, k[:, None], rn[None, :], N // 8, mask)


@triton.jit
def _value_group(g_idx_ptr, k, mask, group_size, LAYOUT: tl.constexpr):
    """The group of row k of the weight: g_idx[k] (GPTQ, any order) or k // group_size (AWQ)."""
    if LAYOUT == 0:
        return tl.load(g_idx_ptr + k, mask=mask, other=0)
    return k // group_size


@triton.jit
def _group_zero(qzeros_ptr, group, rn, N, mask, BITS: tl.constexpr, LAYOUT: tl.constexpr):
    """The zero point of each row's group ([rows, BLOCK_N]; group: [rows])."""
    if LAYOUT == 0:
        return _unpack_stream(qzeros_ptr, rn[None, :], group[:, None], 1, N * BITS // 32, mask, BITS)
    return _awq_nibble(qzeros_ptr, group[:, None], rn[None, :], N // 8, mask)


@triton.jit
def w4a16_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, M, N, K, group_size, stride_xm,
                      out_ptr, stride_om,
                      BITS: tl.constexpr, LAYOUT: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, IEEE_FP32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Both layouts at M <= BLOCK_M <= 8 (same arguments as w4a16_kernel; IEEE_FP32 unused). A step of
    BLOCK_K rows of the weight is RUNS runs of RUN consecutive rows, and value j of every run is
    taken at once: at GPTQ, a run is the values of one word (3 bits: of three words), so a step loads
    RUNS x BLOCK_N words (x WORDS) once and takes its values out by shifts, in the words' own register
    layout; at AWQ, value j of a run is row start + j, whose words each hold eight columns. Partial
    sums stay per run until the end: one reduction per program instead of one per step."""
    RUN: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    RUNS: tl.constexpr = BLOCK_K // RUN
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    runs = tl.arange(0, RUNS)
    acc = tl.zeros((BLOCK_M, RUNS, BLOCK_N), dtype=tl.float32)
    for k_step in range(tl.program_id(2), tl.cdiv(K, BLOCK_K), SPLIT_K):
        run = k_step * RUNS + runs
        w0, w1, w2 = _run_words(qweight_ptr, run, rn, n_mask, N, K, BITS, LAYOUT)
        # Without act-order every run lies in one group (GPTQ's group sizes are multiples of a run, and
        # AWQ's usually are): then scales and zeros are read once per run, not once per value.
        start = run * RUN
        values = start[:, None] + tl.arange(0, RUN)[None, :]
        group = _value_group(g_idx_ptr, start, start < K, group_size, LAYOUT)
        mixed = tl.sum(tl.where((_value_group(g_idx_ptr, values, values < K, group_size, LAYOUT) != group[:, None])
                                & (values < K), 1, 0))
        if mixed == 0:
            mask = (start < K)[:, None] & n_mask[None, :]
            run_zero = _group_zero(qzeros_ptr, group, rn, N, mask, BITS, LAYOUT) + ZERO_OFFSET
            run_scale = tl.load(scales_ptr + tile_offsets(group, N, rn), mask=mask, other=0.0).to(tl.float32)
            for j in range(RUN):
                k = start + j
                q = _run_value(qweight_ptr, w0, w1, w2, j, k, rn, N, (k < K)[:, None] & n_mask[None, :], BITS, LAYOUT)
                w = (q - run_zero).to(tl.float32) * run_scale
                a = tl.load(x_ptr + tile_offsets(rm, stride_xm, k), mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
                acc += a.to(tl.float32)[:, :, None] * w[None, :, :]
        else:
            for j in range(RUN):
                k = start + j
                k_mask = k < K
                mask = k_mask[:, None] & n_mask[None, :]
                value_group = _value_group(g_idx_ptr, k, k_mask, group_size, LAYOUT)
                zero = _group_zero(qzeros_ptr, value_group, rn, N, mask, BITS, LAYOUT)
                scale = tl.load(scales_ptr + tile_offsets(value_group, N, rn), mask=mask, other=0.0)
                q = _run_value(qweight_ptr, w0, w1, w2, j, k, rn, N, mask, BITS, LAYOUT)
                w = (q - (zero + ZERO_OFFSET)).to(tl.float32) * scale.to(tl.float32)
                a = tl.load(x_ptr + tile_offsets(rm, stride_xm, k), mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                acc += a.to(tl.float32)[:, :, None] * w[None, :, :]
    store_tile(tl.sum(acc, axis=1), out_ptr, stride_om, bias_ptr, rm, rn, m_mask, n_mask, HAS_BIAS, SPLIT_K)


def _argument_types(dtype: str, constants: dict) -> dict:
    return {"x_ptr": pointer(dtype), "qweight_ptr": "*i32", "qzeros_ptr": "*i32", "scales_ptr": "*fp16",
            "g_idx_ptr": "*i32", "bias_ptr": pointer(dtype), "M": "i32", "N": "i32", "K": "i32", "group_size": "i32",
            "stride_xm": "i32", "out_ptr": out_pointer(dtype, constants), "stride_om": "i32"}


GPTQ_VARIANTS = {f"gptq-{bits}bit": {"BITS": bits, "LAYOUT": LAYOUTS["gptq"]} for bits in (2, 3, 4, 8)}
# ZERO_OFFSET and HAS_BIAS add one term; IEEE_FP32 only matters for fp32 activations, which a GPU
# does not run here (see KernelSpec.dtypes)
FIXED = {"ZERO_OFFSET": 1, "HAS_BIAS": True, "IEEE_FP32": False}
VARIANTS = {**GPTQ_VARIANTS, "awq-4bit": {"BITS": 4, "LAYOUT": LAYOUTS["awq"]}}
W4A16 = KernelSpec("w4a16", w4a16_kernel, "tiled", VARIANTS, _argument_types, FIXED)
W4A16_GEMV = KernelSpec("w4a16_gemv", w4a16_gemv_kernel, "gemv", VARIANTS, _argument_types, FIXED)
SPECS = (W4A16, W4A16_GEMV)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, bias: torch.Tensor | None, *, bits: int, layout: str,
                 zero_offset: int = 1, group_size: int = 0, config: dict | None = None,
                 path: str = "auto") -> torch.Tensor:
    """y [..., N] = x [..., K] @ W (the dequantized [K, N] weight) + bias, in x's dtype.

    path: "auto" runs the GEMV at M <= 8 rows and the tiled kernel otherwise; "gemv" or "tiled"
    force one (to compare them)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if layout == "awq" and (bits != 4 or group_size < 1):
        raise ValueError("the awq layout is 4-bit with a positive group_size")
    if layout == "gptq" and g_idx is None:
        raise ValueError("the gptq layout needs g_idx")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = rows.shape
    N = scales.shape[1]
    gemv = M <= GEMV_MAX_M and path != "tiled"
    if path == "gemv" and not gemv:
        raise ValueError(f"the GEMV path takes M <= {GEMV_MAX_M} rows, not M = {M} (use path='tiled' or 'auto')")
    args = (rows, qweight, qzeros, scales, g_idx if g_idx is not None else qweight,
            bias if bias is not None else scales, M, N, K, max(group_size, 1), rows.stride(0))

    y = run_tiled(W4A16_GEMV if gemv else W4A16, args, M, N, K, x, x.dtype, config, BITS=bits,
                  LAYOUT=LAYOUTS[layout], ZERO_OFFSET=zero_offset, HAS_BIAS=bias is not None,
                  IEEE_FP32=rows.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], N)


__all__ = ["w4a16_gemv_kernel", "w4a16_kernel", "w4a16_matmul"]
