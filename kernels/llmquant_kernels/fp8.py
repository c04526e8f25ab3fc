"""FP8 weight-only matmul with block scales (DeepSeek-V3's layout, as compressed-tensors stores it).

y[m, n] = sum_k x[m, k] * w[n, k] * s[n // B, k // B] (+ bias[n]), with w float8 e4m3 [N, K] and s
fp32 [ceil(N / B), ceil(K / B)]. Each K tile of the weight is loaded as e4m3, widened and scaled
in registers (one scale per weight, read from the small scale table) and multiplied in the
activations' dtype with fp32 accumulation, so the weight crosses memory at one byte per value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelSpec, out_pointer, pointer
from ._tiles import dot_fp32, output_tile, run_tiled, store_tile, tile_offsets, transposed_tile_offsets


@triton.jit
def fp8_block_matmul_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, M, N, K, SCALE_COLUMNS, BLOCK_SCALE, out_ptr, stride_om,
                            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, IEEE_FP32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    scale_rows = (rn // BLOCK_SCALE).to(tl.int64) * SCALE_COLUMNS
    for k_tile in range(tl.program_id(2), tl.cdiv(K, BLOCK_K), SPLIT_K):
        rk = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_ptr + tile_offsets(rm, K, rk), mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        tile_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_ptr + transposed_tile_offsets(rn, K, rk), mask=tile_mask, other=0.0)  # [K, N] e4m3
        s = tl.load(s_ptr + scale_rows[None, :] + (rk // BLOCK_SCALE)[:, None], mask=tile_mask, other=0.0)
        acc = dot_fp32(acc, x, (w.to(tl.float32) * s).to(x.dtype), IEEE_FP32)
    store_tile(acc, out_ptr, stride_om, bias_ptr, rm, rn, m_mask, n_mask, HAS_BIAS, SPLIT_K)


def _argument_types(dtype: str, constants: dict) -> dict:
    return {"x_ptr": pointer(dtype), "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "bias_ptr": pointer(dtype), "M": "i32",
            "N": "i32", "K": "i32", "SCALE_COLUMNS": "i32", "BLOCK_SCALE": "i32", "out_ptr": out_pointer(dtype, constants),
            "stride_om": "i32"}


# e4m3 (Triton's fp8e4nv) exists from compute capability 8.9 on: sm_80 refuses the type
FP8_BLOCK = KernelSpec("fp8_block", fp8_block_matmul_kernel, "tiled", {"e4m3": {}}, _argument_types,
                       {"HAS_BIAS": True, "IEEE_FP32": False}, targets=(89, 90))
SPECS = (FP8_BLOCK,)


def fp8_block_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: int,
                     bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x [..., K] @ dequantized(weight e4m3 [N, K], scale [ceil(N / block), ceil(K / block)])^T (+ bias)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = rows.shape
    N = weight.shape[0]
    scale = scale.float().contiguous()
    args = (rows, weight.contiguous(), scale, bias if bias is not None else scale, M, N, K, scale.shape[1], block)
    out = run_tiled(FP8_BLOCK, args, M, N, K, rows, x.dtype, config, HAS_BIAS=bias is not None,
                    IEEE_FP32=x.dtype == torch.float32)
    return out.reshape(*x.shape[:-1], N)
