"""Per-channel input scaling folded into the preceding operation (AWQ, SmoothQuant).

For a ScalingPair resolved in one block, dividing the previous operation's output channel j by
s_j and multiplying column j of every following linear by s_j leaves the block's function
unchanged (up to float rounding); only what the quantizer sees changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import ArchMap
from .statistics import InputGram


@dataclass
class ScalingGroup:
    """One scaling pair of one block, with the statistics of the linears' common input.

    name: the previous operation's full name; linears: full name -> module;
    quantized: the names among `linears` that will be quantized (the rest are only rescaled).
    """

    name: str
    previous: nn.Module
    linears: dict[str, nn.Linear]
    quantized: tuple[str, ...]
    statistics: InputGram | None = None
    norm_weight_offset: float = 0.0

    @property
    def channels(self) -> int:
        return next(iter(self.linears.values())).weight.shape[1]

    @torch.no_grad()
    def fold(self, scales: torch.Tensor) -> None:
        """Divide the previous operation's outputs by `scales`, multiply the linears' inputs by them.
        Each product is computed in float32 and cast once to the tensor's dtype: in an fp16 / bf16
        model a scale rounded to that dtype first would no longer be the one the other side of the
        pair divides by (and a large one would overflow fp16)."""
        s = scales.detach().float()
        previous = self.previous
        if isinstance(previous, nn.Linear):
            _assign(previous.weight, previous.weight.float() / s.to(previous.weight.device)[:, None])
        else:
            weight = previous.weight
            _assign(weight, (weight.float() + self.norm_weight_offset) / s.to(weight.device) - self.norm_weight_offset)
        if getattr(previous, "bias", None) is not None:
            _assign(previous.bias, previous.bias.float() / s.to(previous.bias.device))
        for linear in self.linears.values():
            _assign(linear.weight, linear.weight.float() * s.to(linear.weight.device)[None, :])
        if self.statistics is not None:
            self.statistics = self.statistics.rescaled(s)


def _assign(tensor: torch.Tensor, value: torch.Tensor) -> None:
    tensor.copy_(value)  # the one cast, float32 -> the tensor's dtype


@dataclass
class BlockTransform:
    """What a block transform (AWQ, SmoothQuant) did: the weights (after scaling, before any
    clipping) that each quantized linear's output error is measured against, and a record per group."""

    reference_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


def scaling_groups(block: nn.Module, arch: ArchMap, prefix: str, quantized: set[str]) -> list[ScalingGroup]:
    """The architecture map's scaling pairs in one block that have a linear to quantize and fit
    together (the previous operation's width equals the linears' input width)."""
    groups = []
    for pair in arch.block_scaling_pairs(block):
        previous = block.get_submodule(pair.previous)
        # `linears` may hold a router: a module with an [out, in] weight that is no nn.Linear
        linears = {f"{prefix}.{short}": block.get_submodule(short) for short in pair.linears}
        width = previous.out_features if isinstance(previous, nn.Linear) else _norm_width(previous, pair.previous)
        if any(linear.weight.shape[1] != width for linear in linears.values()):
            continue
        # An input rotated online (R4, rotation/online.py) mixes its channels between the previous
        # operation and the linear: a per-channel scale folded into that operation would not reach the
        # linear's columns unmixed (SmoothQuant's up_proj -> down_proj pair would change the function).
        if any(hasattr(linear, "input_rotation") for linear in linears.values()):
            continue
        chosen = tuple(name for name in linears if name in quantized)
        if chosen:
            groups.append(ScalingGroup(f"{prefix}.{pair.previous}", previous, linears, chosen,
                                       norm_weight_offset=arch.norm_weight_offset))
    return groups


def _norm_width(norm: nn.Module, name: str) -> int:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise TypeError(f"{name} ({type(norm).__name__}) has no per-channel weight to fold scales into")
    return weight.shape[0]
