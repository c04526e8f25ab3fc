"""W8A8: int8 activations x int8 weights -> int32 accumulation -> scale epilogue.

quantize_rows_int8: symmetric int8 codes of each row of x, per row (scale = max|row| / 127, the
dynamic per-token grid) or with one given static scale; codes = clamp(round(x / scale), -128, 127),
rounding half to even as torch.round does.
int8_scaled_matmul: y[m, n] = (sum_k a[m, k] * b[n, k]) * a_scale[m] * b_scale[n] (+ bias[n]), with
b the int8 weight [N, K] as compressed-tensors stores it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelSpec, launch_options, out_pointer, pointer
from ._tiles import output_tile, run_tiled, store_tile, tile_offsets, transposed_tile_offsets


@triton.jit
def quantize_rows_kernel(x_ptr, codes_ptr, scales_ptr, static_scale_ptr, K, stride_xm,
                         STATIC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * K passes 2**31 for long prompts of wide models
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    else:
        absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            rk = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.abs(x))
        scale = tl.maximum(tl.max(absmax, axis=0) / 127.0, 1e-12)  # a row of zeros: any scale gives codes 0
        tl.store(scales_ptr + row, scale)
    for start in range(0, K, BLOCK_K):
        rk = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
        scaled = tl.math.div_rn(x, scale)
        # adding and subtracting 1.5 * 2^23 rounds an fp32 below 2^22 in magnitude to an integer, ties to
        # even, as torch.round does (values beyond are clamped anyway)
        rounded = (tl.minimum(tl.maximum(scaled, -256.0), 256.0) + 12582912.0) - 12582912.0
        codes = tl.minimum(tl.maximum(rounded, -128.0), 127.0)
        tl.store(codes_ptr + row * K + rk, codes.to(tl.int8), mask=rk < K)


# one program per row, BLOCK_K values of it per step: K rounded up to a power of two, at most 256
ROW_BLOCKS = tuple(2 ** i for i in range(9))


def _row_argument_types(dtype: str, constants: dict) -> dict:
    return {"x_ptr": pointer(dtype), "codes_ptr": "*i8", "scales_ptr": "*fp32", "static_scale_ptr": "*fp32",
            "K": "i32", "stride_xm": "i32"}


QUANTIZE_ROWS = KernelSpec("quantize_rows_int8", quantize_rows_kernel, "rows",
                           {"dynamic": {"STATIC": False}, "static": {"STATIC": True}}, _row_argument_types,
                           configs=tuple({"BLOCK_K": block, "num_warps": 4, "num_stages": 3} for block in ROW_BLOCKS))


def quantize_rows_int8(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [M, K], fp32 scales [M, 1]) of the rows of x [M, K] (per row, or the static scale)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = rows.shape
    codes = torch.empty((M, K), device=x.device, dtype=torch.int8)
    if static_scale is not None:
        scales = static_scale.float().reshape(1, 1).expand(M, 1)
        scale_arg = static_scale.float().reshape(1).contiguous()
    else:
        scales = torch.empty((M, 1), device=x.device, dtype=torch.float32)
        scale_arg = scales
    config = QUANTIZE_ROWS.configs[ROW_BLOCKS.index(min(ROW_BLOCKS[-1], triton.next_power_of_2(K)))]
    quantize_rows_kernel[(M,)](rows, codes, scales, scale_arg, K, rows.stride(0), STATIC=static_scale is not None,
                               **launch_options(config))
    return codes, scales


@triton.jit
def int8_scaled_matmul_kernel(a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, out_ptr, stride_om,
                              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_tile in range(tl.program_id(2), tl.cdiv(K, BLOCK_K), SPLIT_K):
        rk = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(a_ptr + tile_offsets(rm, K, rk), mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptr + transposed_tile_offsets(rn, K, rk), mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(a, b)
    a_scale = tl.load(a_scale_ptr + rm, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + rn, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    store_tile(y, out_ptr, stride_om, bias_ptr, rm, rn, m_mask, n_mask, HAS_BIAS, SPLIT_K)


def _gemm_argument_types(dtype: str, constants: dict) -> dict:
    return {"a_ptr": "*i8", "b_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": pointer(dtype),
            "M": "i32", "N": "i32", "K": "i32", "out_ptr": out_pointer(dtype, constants), "stride_om": "i32"}


INT8_GEMM = KernelSpec("int8_scaled_matmul", int8_scaled_matmul_kernel, "tiled", {"int8": {}}, _gemm_argument_types,
                       {"HAS_BIAS": True}, keyed_by_output=True)
SPECS = (QUANTIZE_ROWS, INT8_GEMM)


def int8_scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                       config: dict | None = None) -> torch.Tensor:
    """y [M, N] = (a int8 [M, K] @ b int8 [N, K]^T) * a_scale [M, 1] * b_scale [N] (+ bias), in out_dtype."""
    M, K = a.shape
    N = b.shape[0]
    a_scale = a_scale.float().reshape(-1).expand(M).contiguous()
    b_scale = b_scale.float().reshape(-1).contiguous()
    a, b = a.contiguous(), b.contiguous()

    args = (a, b, a_scale, b_scale, bias if bias is not None else b_scale, M, N, K)

    return run_tiled(INT8_GEMM, args, M, N, K, a, out_dtype, config, HAS_BIAS=bias is not None)
