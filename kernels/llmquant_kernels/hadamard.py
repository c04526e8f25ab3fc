"""Fast Hadamard transform of rows: y = x @ (A ⊗ H_P) * scale, with H_P Sylvester's Hadamard matrix of a
power-of-two order P and A a small dense matrix (a known Hadamard matrix of an order that is no power
of two, or none). Orders that are not powers of two are built this way (QuaRot's construction):
1536 = 12 x 128, 14336 = 224 x 64.

Each program transforms one row. The row is held as a [M_PAD, P] tile (element a * P + s at [a, s]):
log2(P) butterfly stages along the second axis give x @ (I ⊗ H_P), in fp32 registers, then one
[M_PAD, M_PAD] x [M_PAD, P] product by A^T mixes the first axis. O(n log P + n m) operations instead of
the dense product's n^2, reading and writing the row once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KernelSpec, launch_options, pointer


@triton.jit
def hadamard_rows_kernel(x_ptr, small_ptr, out_ptr, M, stride_xm, stride_om, scale,
                         HAS_SMALL: tl.constexpr, M_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 for long prompts of wide models
    ra = tl.arange(0, M_PAD)
    rs = tl.arange(0, P)
    offsets = ra[:, None] * P + rs[None, :]
    mask = (ra < M)[:, None]
    y = tl.load(x_ptr + row * stride_xm + offsets, mask=mask, other=0.0).to(tl.float32)
    # Butterfly at stride h: pairs (j, j + h) in each block of 2h become (a + b, a - b). The pair's two
    # halves are moved to a last axis of 2 so that split / join, Triton's only way to address them, apply.
    for stage in tl.static_range(LOG_P):
        h: tl.constexpr = 1 << stage
        pairs = tl.permute(tl.reshape(y, (M_PAD, P // (2 * h), 2, h)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (M_PAD, P))
    if HAS_SMALL:
        # A^T, padded with zeros: padded rows of the tile are zero and padded outputs are not stored
        small_t = tl.load(small_ptr + ra[None, :] * M + ra[:, None], mask=(ra < M)[None, :] & (ra < M)[:, None],
                          other=0.0)
        # ieee: A's entries are +-1 and the tile is fp32; TF32 would round the tile to 10 bits
        y = tl.dot(small_t, y, input_precision="ieee")
    tl.store(out_ptr + row * stride_om + offsets, (y * scale).to(out_ptr.dtype.element_ty), mask=mask)


# The orders of the models' down_proj inputs (and 64, a test size), each one code specialization:
# (M_PAD, P, HAS_SMALL) from the order's factors. tl.dot needs both sides of A^T to be at least 16.
ORDERS = {64: (1, 64), 1536: (12, 128), 2048: (1, 2048), 4864: (152, 32), 8192: (1, 8192), 14336: (224, 64)}


def _tile(small_order: int, power: int) -> dict:
    has_small = small_order > 1
    return {"HAS_SMALL": has_small, "M_PAD": max(16, triton.next_power_of_2(small_order)) if has_small else 1,
            "P": power, "LOG_P": power.bit_length() - 1}


def _argument_types(dtype: str, constants: dict) -> dict:
    return {"x_ptr": pointer(dtype), "small_ptr": "*fp32", "out_ptr": pointer(dtype), "M": "i32", "stride_xm": "i32",
            "stride_om": "i32", "scale": "fp32"}


MIN_DOT_POWER = 16
# A row is held in registers: wide tiles take 8 warps (64 values a thread at 16k) instead of 4
CONFIGS = ({"num_warps": 4, "num_stages": 1}, {"num_warps": 8, "num_stages": 1})
WIDE_TILE = 4096
HADAMARD = KernelSpec("hadamard_rows", hadamard_rows_kernel, "rows",
                      {f"n{n}": _tile(m, p) for n, (m, p) in ORDERS.items()}, _argument_types, configs=CONFIGS)
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
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=x.dtype)
    tile = _tile(m, power)
    if tile["HAS_SMALL"] and power < MIN_DOT_POWER:
        raise ValueError(f"hadamard_transform: the kernel multiplies by the small matrix with tl.dot, which needs "
                         f"a power-of-two part of at least 16; {n} = {m} x {power}")
    small_arg = small.float().contiguous() if small is not None else out.new_empty(1, dtype=torch.float32)
    config = CONFIGS[tile["M_PAD"] * power >= WIDE_TILE]
    hadamard_rows_kernel[(rows.shape[0],)](rows, small_arg, out, m, rows.stride(0), out.stride(0), float(scale),
                                           **tile, **launch_options(config))
    return out.reshape(x.shape)
