"""NF4 / FP4 (bitsandbytes layout) dequantize-and-multiply: y = x @ W^T (+ bias).

W [N, K] is stored as bitsandbytes stores it: codes of the row-major flattened weight, two per
byte (element i in byte i // 2, the high nibble when i is even), a 16-value table, and one absmax
per block of `blocksize` consecutive elements. With double quantization the absmax is itself
8-bit: absmax[b] = nested_table[code[b]] * nested_absmax[b // nested_blocksize] + offset,
dequantized here per tile rather than materialized.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelSpec, out_pointer, pointer
from ._tiles import dot_fp32, output_tile, run_tiled, store_tile, tile_offsets, transposed_tile_offsets


@triton.jit
def codebook4_kernel(x_ptr, packed_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_table_ptr, bias_ptr,
                     M, N, K, blocksize, nested_blocksize, offset, stride_xm, out_ptr, stride_om,
                     NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, IEEE_FP32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm, rn, m_mask, n_mask = output_tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_tile in range(tl.program_id(2), tl.cdiv(K, BLOCK_K), SPLIT_K):
        rk = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(x_ptr + tile_offsets(rm, stride_xm, rk), mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        tile_mask = k_mask[:, None] & n_mask[None, :]
        element = transposed_tile_offsets(rn, K, rk)  # [BLOCK_K, BLOCK_N] flat index of W[n, k]
        byte = tl.load(packed_ptr + element // 2, mask=tile_mask, other=0).to(tl.int32)
        code = tl.where(element % 2 == 0, byte >> 4, byte & 0xF)
        value = tl.load(table_ptr + code, mask=tile_mask, other=0.0)
        block = element // blocksize
        if NESTED:
            absmax_code = tl.load(absmax_ptr + block, mask=tile_mask, other=0).to(tl.int32)
            absmax = tl.load(nested_table_ptr + absmax_code, mask=tile_mask, other=0.0) \
                * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=tile_mask, other=0.0) + offset
        else:
            absmax = tl.load(absmax_ptr + block, mask=tile_mask, other=0.0)
        acc = dot_fp32(acc, a, (value * absmax).to(a.dtype), IEEE_FP32)
    store_tile(acc, out_ptr, stride_om, bias_ptr, rm, rn, m_mask, n_mask, HAS_BIAS, SPLIT_K)


def _argument_types(dtype: str, constants: dict) -> dict:
    return {"x_ptr": pointer(dtype), "packed_ptr": "*u8", "absmax_ptr": "*u8" if constants["NESTED"] else "*fp32",
            "table_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_table_ptr": "*fp32", "bias_ptr": pointer(dtype),
            "M": "i32", "N": "i32", "K": "i32", "blocksize": "i32", "nested_blocksize": "i32", "offset": "fp32",
            "stride_xm": "i32", "out_ptr": out_pointer(dtype, constants), "stride_om": "i32"}


CODEBOOK4 = KernelSpec("codebook4", codebook4_kernel, "tiled", {"fp32-absmax": {"NESTED": False},
                                                                 "double-quant": {"NESTED": True}},
                       _argument_types, {"HAS_BIAS": True, "IEEE_FP32": False})
SPECS = (CODEBOOK4,)


def codebook4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
                     blocksize: int, shape: tuple[int, int], bias: torch.Tensor | None = None,
                     nested: tuple | None = None, config: dict | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T for W [N, K] = shape; nested = (nested_absmax, nested_table, offset,
    nested_blocksize) when absmax holds 8-bit codes."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = rows.shape
    N = shape[0]
    if shape[1] != K:
        raise ValueError(f"x has {K} features, the weight {shape[1]}")
    nested_absmax, nested_table, offset, nested_blocksize = nested if nested is not None else (absmax, table, 0.0, 1)
    table = table.float().contiguous()

    args = (rows, packed, absmax, table, nested_absmax, nested_table.float().contiguous(),
            bias if bias is not None else table, M, N, K, blocksize, nested_blocksize, float(offset), rows.stride(0))

    y = run_tiled(CODEBOOK4, args, M, N, K, x, x.dtype, config, NESTED=nested is not None,
                  HAS_BIAS=bias is not None, IEEE_FP32=rows.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], N)
