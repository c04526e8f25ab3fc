"""The affine weight of a GPTQ or AWQ linear, in one format-neutral view for the CPU conversions:
w[o, i] = (codes[i, o] - zeros[g, o]) * scales[g, o] with g = group_of_column[i]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...storage import bitpack
from .. import ops
from ..nn import AWQLinear, GPTQLinear


@dataclass
class AffineWeight:
    bits: int
    in_features: int
    out_features: int
    group_of_column: torch.Tensor  # int64 [in]
    scales: torch.Tensor  # [groups, out], as stored (fp16)
    unpack: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # () -> (codes int32 [in, out], zeros int32 [groups, out])

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[0] == 1

    def column_order(self) -> torch.Tensor | None:
        """Input columns sorted by group (stable), or None when they already are (no act-order)."""
        g = self.group_of_column
        if bool((g[1:] >= g[:-1]).all()):
            return None
        return torch.argsort(g, stable=True)

    def contiguous_group(self, candidates: tuple[int, ...], order: torch.Tensor | None) -> int | None:
        """The largest of `candidates` such that, with the columns in `order`, every run of that many
        consecutive columns lies in one group (so one scale per run reproduces the weight exactly)."""
        g = self.group_of_column if order is None else self.group_of_column[order]
        for size in sorted(candidates, reverse=True):
            if self.in_features % size == 0:
                runs = g.view(-1, size)
                if bool((runs == runs[:, :1]).all()):
                    return size
        return None


def affine_weight(module) -> AffineWeight | None:
    """The affine view of a GPTQLinear / AWQLinear (codes unpacked only when asked); None for others."""
    if isinstance(module, GPTQLinear):
        def unpack_gptq():
            return (bitpack.unpack(module.qweight, module.bits, dim=0),
                    bitpack.unpack(module.qzeros, module.bits, dim=1) + module.zero_offset)

        return AffineWeight(module.bits, module.in_features, module.out_features, module.g_idx.long(),
                            module.scales, unpack_gptq)
    if isinstance(module, AWQLinear):
        columns = torch.arange(module.in_features, device=module.qweight.device)
        return AffineWeight(4, module.in_features, module.out_features, columns // module.group_size,
                            module.scales, lambda: (ops.unpack_awq(module.qweight), ops.unpack_awq(module.qzeros)))
    return None


def stacking_refusal(weights: list[AffineWeight]) -> str | None:
    """Why these weights cannot run as one with their output channels end to end, or None."""
    first = weights[0]
    if any(w.bits != first.bits for w in weights):
        return "their bit widths differ"
    if any(w.scales.shape[0] != first.scales.shape[0] or not torch.equal(w.group_of_column, first.group_of_column)
           for w in weights):
        return "their input columns are grouped differently (group sizes or act-order orders differ)"
    return None


def stacked(weights: list[AffineWeight]) -> AffineWeight:
    """One weight whose output channels are those of `weights` in order (see stacking_refusal)."""
    if len(weights) == 1:
        return weights[0]

    def unpack():
        codes, zeros = zip(*(w.unpack() for w in weights))
        return torch.cat(codes, dim=1), torch.cat(zeros, dim=1)

    first = weights[0]
    return AffineWeight(first.bits, first.in_features, sum(w.out_features for w in weights), first.group_of_column,
                        torch.cat([w.scales for w in weights], dim=1), unpack)
