"""Blockwise codebook grids: QLoRA's NF4 and FP4 (Dettmers et al., 2023), exactly as bitsandbytes
defines them, so that our packed tensors equal bitsandbytes' own, bit for bit.

A weight is flattened (row-major) and cut into blocks of `blocksize` values; each block is divided
by its absolute maximum and every value is replaced by the index of the nearest entry of a
16-value table in [-1, 1]. Double quantization stores the per-block absmax constants themselves
in 8 bits: their mean is subtracted and the rest is quantized blockwise (blocks of 256) on the
signed 8-bit dynamic table, the same procedure one level down.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

# bitsandbytes' NF4: quantiles of N(0, 1) with an exact zero, normalized to [-1, 1].
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bits, exponent bias 2), in bit-pattern order:
# code k holds this value / 12.
FP4_TABLE_UNNORMALIZED = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
# Block sizes bitsandbytes' kernels accept.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@lru_cache
def four_bit_table(quant_type: str) -> torch.Tensor:
    """The 16 values of a 4-bit type, indexed by code."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    # cached tables live on the CPU (callers move them to their data), whatever the default device
    table = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE_UNNORMALIZED, dtype=torch.float32,
                         device="cpu")
    return table / table.abs().max()


@lru_cache
def dynamic_table() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic type (Dettmers, 2016): a sign, a run of zero bits that sets
    a decimal exponent 10^-6..10^0, and linear fraction bits after the first 1; 256 sorted values.
    Built with the same float32 operations as bitsandbytes so that the values agree exactly."""
    values: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32, device="cpu")
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (-(exponent_bits - 1) + i)) * means).tolist()
        values += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device="cpu")


@lru_cache
def _nearest_bounds(table: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted table values, code of each sorted position)."""
    values = torch.tensor(table, dtype=torch.float32, device="cpu")
    order = torch.argsort(values)
    ordered = values[order]
    return (ordered[:-1] + ordered[1:]) / 2, order


def blockwise_quantize(values: torch.Tensor, table: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n], absmax fp32 [ceil(n / blocksize)]) of a flat tensor: each block scaled by
    its absolute maximum, each value to the nearest table entry (ties to the lower one).

    A full block is multiplied by 1 / absmax but a partial last block divided by it: bitsandbytes
    does so, and the two round differently in the last bit."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    bounds, order = (t.to(flat.device) for t in _nearest_bounds(tuple(table.tolist())))
    codes = order[torch.bucketize(scaled, bounds)]
    return codes.to(torch.uint8), absmax


def code_of_zero(table: torch.Tensor) -> int:
    """The code 0.0 rounds to (bitsandbytes pads an odd count of 4-bit codes with it)."""
    bounds, order = _nearest_bounds(tuple(table.tolist()))
    return int(order[torch.bucketize(torch.zeros(1, device="cpu"), bounds)])


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 [n]: each block of `blocksize` consecutive table values times its absmax (the last block
    may be partial)."""
    n = values.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values.float(), (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (padded * absmax.float()[:, None]).reshape(-1)[:n]


def blockwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 [n] values table[code] * absmax of its block."""
    return scale_blocks(table[codes.reshape(-1).long()], absmax, blocksize)


def dequantize_nested_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_table: torch.Tensor,
                             offset: float, nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """fp32 block constants from their double-quantized form: table[code] * nested_absmax + offset."""
    return blockwise_dequantize(codes, nested_absmax, nested_table, nested_blocksize) + offset


@dataclass
class NestedAbsmax:
    """Double-quantized block constants: absmax = dynamic_table[codes] * nested_absmax + offset."""

    codes: torch.Tensor  # uint8 [blocks]
    nested_absmax: torch.Tensor  # fp32 [ceil(blocks / 256)]
    offset: float
    blocksize: int = NESTED_BLOCKSIZE

    @classmethod
    def quantize(cls, absmax: torch.Tensor) -> "NestedAbsmax":
        offset = absmax.mean()
        codes, nested_absmax = blockwise_quantize(absmax - offset, dynamic_table(), NESTED_BLOCKSIZE)
        return cls(codes, nested_absmax, offset.item())

    def dequantize(self) -> torch.Tensor:
        return dequantize_nested_absmax(self.codes, self.nested_absmax, dynamic_table().to(self.codes.device),
                                        self.offset, self.blocksize)

    def to(self, device) -> "NestedAbsmax":
        return replace(self, codes=self.codes.to(device), nested_absmax=self.nested_absmax.to(device))


@dataclass
class CodebookWeight:
    """Format-neutral result of quantizing one [out, in] weight on a 4-bit codebook grid.

    codes: uint8 [out, in], indices into `table`; absmax: fp32 [blocks], the block scales the
    dequantizer uses (after double quantization: the dequantized ones); nested: the 8-bit form of
    absmax under double quantization, else None.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    quant_type: str
    blocksize: int
    nested: NestedAbsmax | None = None
    bits: int = 4

    @property
    def table(self) -> torch.Tensor:
        return four_bit_table(self.quant_type).to(self.codes.device)

    def to(self, device) -> "CodebookWeight":
        return replace(self, codes=self.codes.to(device), absmax=self.absmax.to(device),
                       nested=None if self.nested is None else self.nested.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = blockwise_dequantize(self.codes, self.absmax, self.table, self.blocksize)
        return values.view(self.codes.shape).to(dtype)


@dataclass(frozen=True)
class CodebookGrid:
    """NF4 / FP4 with blockwise absmax over the flattened weight; data-free."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False
    bits: int = 4

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")

    def quantize(self, weight: torch.Tensor) -> CodebookWeight:
        codes, absmax = blockwise_quantize(weight.detach(), four_bit_table(self.quant_type), self.blocksize)
        nested = None
        if self.double_quant:
            nested = NestedAbsmax.quantize(absmax)
            absmax = nested.dequantize()
        return CodebookWeight(codes.view(weight.shape), absmax, self.quant_type, self.blocksize, nested)

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantize(weight).dequantize(weight.dtype)
