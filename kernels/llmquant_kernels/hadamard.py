"""Fast Hadamard transform of rows: y = x @ (A ⊗ H_P) * scale, with H_P Sylvester's Hadamard matrix of a
power-of-two order P and A a small dense matrix (a known Hadamard matrix of an order that is no power
of two, or none). Orders that are not powers of two are built this way (QuaRot's construction):
1536 = 12 x 128, 14336 = 224 x 64.

Each program transforms one row. The row is held as a [M_PAD, P] tile (element a * P + s at [a, s]):
log2(P) butterfly stages along the second axis give x @ (I ⊗ H_P), in fp32 registers, then one
[M_PAD, M_PAD] x [M_PAD, P] product by A^T mixes the first axis. O(n log P + n m) operations instead of
the dense product's n^2, reading and writing the row once. A small factor too big for that product
(MAX_FUSED_ORDER) is applied by torch after the kernel's butterflies, in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelSpec, launch_options, pointer


@triton.jit
def hadamard_rows_kernel(x_ptr, small_ptr, out_ptr, M, stride_xm, stride_om, scale,
                         HAS_SMALL: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                         FP32_OUT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 for long prompts of wide models
    ra = tl.arange(0, M_PAD)
    rs = tl.arange(0, P)
    offsets = ra[:, None] * P + rs[None, :]
    mask = (ra < M)[:, None]
    y = tl.load(x_ptr + row * stride_xm + offsets, mask=mask, other=0.0).to(tl.float32)
    # Butterfly at stride h: pairs (j, j + h) in each block of 2h become (a + b, a - b). The pair's two
    # halves are moved to a last axis of 2 so that split / join, Triton's only way to address them, apply.
    for stage in tl.static_range(LOG_P):
        pairs = tl.permute(tl.reshape(y, (M_PAD, P >> (stage + 1), 2, 1 << stage)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (M_PAD, P))
    if HAS_SMALL:
        # A^T, padded with zeros: padded rows of the tile are zero and padded outputs are not stored
        small_t = tl.load(small_ptr + ra[None, :] * M + ra[:, None], mask=(ra < M)[None, :] & (ra < M)[:, None],
                          other=0.0)
        # ieee: A's entries are +-1 and the tile is fp32; TF32 would round the tile to 10 bits
        y = tl.dot(small_t, y, input_precision="ieee")
    tl.store(out_ptr + row * stride_om + offsets, (y * scale).to(out_ptr.dtype.element_ty), mask=mask)


# The small factor is multiplied in the kernel (tl.dot, every side at least 16) up to this padded order;
# a larger one (Llama-3-8B's 224, Qwen2-0.5B's 152: A^T alone would take 256 KB of shared memory), or a
# power-of-two part below 16 (SmolLM2's 576 = 72 x 8), is one batched torch product after the kernel's
# butterflies, which then see rows of P values.
MAX_FUSED_ORDER = 64
MIN_DOT_POWER = 16


def _tile(small_order: int, power: int) -> dict:
    fused = (small_order > 1 and max(16, triton.next_power_of_2(small_order)) <= MAX_FUSED_ORDER
             and power >= MIN_DOT_POWER)
    # FP32_OUT (unfused): the butterflies' fp32 result goes to the product, not rounded to x's dtype
    return {"HAS_SMALL": fused, "M_PAD": max(16, triton.next_power_of_2(small_order)) if fused else 1,
            "P": power, "LOG_P": power.bit_length() - 1, "FP32_OUT": small_order > 1 and not fused}


def _label(tile: dict) -> str:
    if tile["HAS_SMALL"]:
        return f"A{tile['M_PAD']} x H{tile['P']}"
    return f"H{tile['P']} to fp32" if tile["FP32_OUT"] else f"H{tile['P']}"


# The orders of the models' down_proj inputs (and 64, a test size) as (small order, power of two), each
# tile one code specialization: SmolLM2-135M 1536, SmolLM2-360M / Llama 2048 and 8192, Qwen2-0.5B 4864,
# Llama-3-8B / Mistral-7B 14336.
ORDERS = {64: (1, 64), 1536: (12, 128), 2048: (1, 2048), 4864: (152, 32), 8192: (1, 8192), 14336: (224, 64)}
VARIANTS = {_label(_tile(m, p)): _tile(m, p) for m, p in ORDERS.values()}


def _argument_types(dtype: str, constants: dict) -> dict:
    return {"x_ptr": pointer(dtype), "small_ptr": "*fp32",
            "out_ptr": "*fp32" if constants["FP32_OUT"] else pointer(dtype), "M": "i32", "stride_xm": "i32",
            "stride_om": "i32", "scale": "fp32"}


# A row is held in registers: wide tiles take 8 warps (64 values a thread at 16k) instead of 4
CONFIGS = ({"num_warps": 4, "num_stages": 1}, {"num_warps": 8, "num_stages": 1})
WIDE_TILE = 4096
HADAMARD = KernelSpec("hadamard_rows", hadamard_rows_kernel, "rows",
                      VARIANTS, _argument_types, configs=CONFIGS)
SPECS = (HADAMARD,)


def hadamard_transform(x: torch.Tensor, small: torch.Tensor | None, scale: float) -> torch.Tensor:
    """x [..., n] @ (small ⊗ H_P) * scale, n = m * P with m small's order (1 when None) and P a power of two,
    in x's dtype (computed in fp32)."""
    n = x.shape[-1]
    m = 1 if small is None else small.shape[0]
    power = n // m
    if n % m or power & (power - 1) or (small is not None and tuple(small.shape) != (m, m)):
        raise ValueError(f"hadamard_transform: the order {n} is not a power of two times the small matrix's "
                         f"order {m} ({tuple(small.shape) if small is not None else None})")
    tile = _tile(m, power)
    if not tile["HAS_SMALL"] and small is not None:
        # the butterflies on rows of P values, kept in fp32 for the small factor's product that follows
        blocks = x.contiguous().view(-1, power)
        z = torch.empty(blocks.shape, device=x.device, dtype=torch.float32)
        _launch(blocks, None, z, 1, 1.0, tile)
        return (torch.matmul(small.float().t(), z.view(-1, m, power)) * scale).reshape(x.shape).to(x.dtype)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=x.dtype)
    _launch(rows, small, out, m, scale, tile)
    return out.reshape(x.shape)


def _launch(rows: torch.Tensor, small: torch.Tensor | None, out: torch.Tensor, m: int, scale: float, tile: dict):
    small_arg = small.float().contiguous() if tile["HAS_SMALL"] else out.new_empty(1, dtype=torch.float32)
    config = CONFIGS[tile["M_PAD"] * tile["P"] >= WIDE_TILE]
    hadamard_rows_kernel[(rows.shape[0],)](rows, small_arg, out, m, rows.stride(0), out.stride(0), float(scale),
                                           **tile, **launch_options(config))
