"""Pieces every tiled matmul kernel here shares: the output tile of a program, 64-bit tile offsets,
the fp32 dot, and the epilogue (bias on the first K split, then a store, or an atomic add when K
is split)."""
import torch
import triton
import triton.language as tl

from ._launch import dtype_name, launch_options, pick_config


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, columns, row mask, column mask) of this program's output tile."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def tile_offsets(rows, row_stride, columns):
    """rows[:, None] * row_stride + columns[None, :], in 64 bits: M·K, K·N and M·N pass 2**31 on real
    shapes (a 128k-vocabulary head at 16k tokens), where 32-bit offsets would wrap around."""
    return rows[:, None].to(tl.int64) * row_stride + columns[None, :]


@triton.jit
def transposed_tile_offsets(rows, row_stride, columns):
    """The same offsets laid out [columns, rows]: a [K, N] tile of a row-major [N, K] weight."""
    return rows[None, :].to(tl.int64) * row_stride + columns[:, None]


@triton.jit
def dot_fp32(acc, a, w, IEEE_FP32: tl.constexpr):
    """acc + a @ w; fp32 inputs in full precision (not TF32), so that results match the reference."""
    if IEEE_FP32:
        return acc + tl.dot(a, w, input_precision="ieee")
    return acc + tl.dot(a, w)


@triton.jit
def store_tile(acc, out_ptr, stride_om, bias_ptr, rm, rn, m_mask, n_mask, HAS_BIAS: tl.constexpr,
               SPLIT_K: tl.constexpr):
    if HAS_BIAS:
        if tl.program_id(2) == 0:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + tile_offsets(rm, stride_om, rn)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def run_tiled(spec, args: tuple, M: int, N: int, K: int, like: torch.Tensor, out_dtype, config: dict | None,
              **constants) -> torch.Tensor:
    """out [M, N] of `spec.kernel(*args, out, out.stride(0), **constants)` over output tiles x K splits,
    with `config` or the one chosen for this shape among the spec's candidates (see _launch); a split
    K accumulates into a zeroed fp32 buffer (so repeated tuning trials start from zero). `like`: a
    tensor on the device, of the activations' dtype."""
    kernel = spec.kernel
    key_dtype = out_dtype if spec.keyed_by_output else like.dtype
    if like.device.type == "cuda" and dtype_name(key_dtype) not in spec.dtypes:
        raise ValueError(f"{spec.name} runs on a GPU with {' or '.join(spec.dtypes)}, not {dtype_name(key_dtype)}")

    def launch(cfg: dict) -> torch.Tensor:
        split_k = cfg["SPLIT_K"]
        out = (torch.zeros if split_k > 1 else torch.empty)((M, N), device=like.device,
                                                            dtype=torch.float32 if split_k > 1 else out_dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split_k)
        kernel[grid](*args, out, out.stride(0), **constants, **launch_options(cfg))
        return out

    return launch(config or pick_config(spec, constants, M, N, K, like, launch, key_dtype)).to(out_dtype)
