"""hadamard_transform: the online rotation (R4) of x by a Hadamard matrix over its last dim.

Numerics: x [..., n] @ (small ⊗ H_P) * scale, H_P Sylvester's Hadamard matrix of the power of two
P = n / m and small an m x m matrix (rotation.hadamard.hadamard_factors; None when n is a power of
two), computed in fp32 and returned in x's dtype.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ...rotation.hadamard import sylvester
from .registry import call, declare


def hadamard_transform(x: torch.Tensor, small: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """x [..., n] @ (small ⊗ H_P) * scale over the last dim, in O(n log n) instead of the dense
    product's n^2."""
    n = x.shape[-1]
    m = 1 if small is None else small.shape[0]
    if n % m or (n // m) & (n // m - 1) or (small is not None and small.shape != (m, m)):
        raise ValueError(f"hadamard_transform: the last dim {n} is not a power of two times the small matrix's "
                         f"order {m}")
    return call("hadamard_transform", x, small, float(scale))


# The reference multiplies by H_P as a Kronecker product of Sylvester blocks of up to this order, one
# matmul per block over its axis of the row: log_128(P) passes over memory instead of the log_2(P)
# elementwise ones of radix-2 butterflies (measured: eval/bench_hadamard.py).
HADAMARD_RADIX = 128


@declare("hadamard_transform", output_features=None)
def hadamard_transform_reference(x: torch.Tensor, small: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    n = x.shape[-1]
    power = n // (1 if small is None else small.shape[0])
    blocks = []
    while power > 1:  # H_P = H_k1 ⊗ H_k2 ⊗ ... (Sylvester's matrices are Kronecker powers of H_2)
        blocks.append(min(power, HADAMARD_RADIX))
        power //= blocks[-1]
    factors = ([small.to(device=x.device, dtype=torch.float32)] if small is not None else []) + \
        [sylvester_hadamard(k, x.device) for k in blocks]
    y = x.float().reshape(-1, n)
    after = n
    for factor in factors:  # x @ (F1 ⊗ F2 ⊗ ...): each factor mixes its own axis of the row, [.., k, after]
        k = factor.shape[0]
        after //= k
        y = y.reshape(-1, k) @ factor if after == 1 else torch.matmul(factor.t(), y.reshape(-1, k, after))
    return (y.reshape(x.shape) * scale).to(x.dtype)


@functools.lru_cache(maxsize=None)
def sylvester_hadamard(k: int, device: torch.device) -> torch.Tensor:
    return sylvester(k).to(device=device, dtype=torch.float32)
