"""Hadamard matrices (entries +-1, H H^T = n I) of the orders models use: Sylvester's for powers of two,
Paley's first construction (q prime, q = 3 mod 4, order q + 1), and Kronecker products of those. They
exist only for orders 1, 2 and multiples of 4; the rotations (fused.py, online.py) fall
back to a seeded random orthogonal matrix where none is built here."""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache
def _paley_orders(limit: int = 1024) -> dict[int, int]:
    """{order: q} of the Hadamard matrices Paley's first construction gives (q prime, q = 3 mod 4)."""
    def prime(q):
        return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))
    return {q + 1: q for q in range(3, limit) if q % 4 == 3 and prime(q)}


def _paley(q: int) -> torch.Tensor:
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    jacobsthal = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Q[i, j] = chi(j - i)
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1
    core[1:, 0] = -1
    core[1:, 1:] = jacobsthal
    return core + torch.eye(q + 1, dtype=torch.float64)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@lru_cache
def hadamard_factors(n: int) -> tuple[torch.Tensor | None, int] | None:
    """(A, P) with A a Hadamard matrix of an order that is no power of two (None when n is one) and P a
    power of two, such that A ⊗ H_P (H_P Sylvester's) is a Hadamard matrix of order n; None where no such
    pair is built here. The fast transform (ops.hadamard_transform) multiplies by it in this form."""
    twos = n & -n
    odd = n // twos
    if odd == 1:
        return None, n
    paley = _paley_orders()
    for order, q in paley.items():  # one Paley factor, the rest a power of two
        if order % odd == 0 and (order // odd) & (order // odd - 1) == 0 and twos % (order // odd) == 0:
            return _paley(q), n // order
    for a, qa in paley.items():  # two Paley factors
        for b, qb in paley.items():
            product = a * b
            if product % odd == 0 and (product // odd) & (product // odd - 1) == 0 and twos % (product // odd) == 0:
                return torch.kron(_paley(qa), _paley(qb)), n // product
    return None


@lru_cache
def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I), or None where none is built here."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    small, power = factors
    return sylvester(power) if small is None else torch.kron(small, sylvester(power))


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal n x n matrix in float64 (QR of a Gaussian matrix, signs fixed so that
    the seed alone decides it): the fallback where no Hadamard matrix is built."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
