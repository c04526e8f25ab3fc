"""ArchMap: the declarative description of one model family that the pipeline needs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ScalingPair:
    """An operation whose output channels feed the inputs of `linears` one to one, with nothing
    between them that a per-channel scale does not pass through: dividing its output channel j
    by s_j and multiplying input column j of each linear by s_j leaves the function unchanged.
    previous: a norm (RMSNorm / LayerNorm weight) or a linear (its rows are divided)."""

    previous: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchMap:
    """name: family name shown to users.
    model_types: `config.model_type` values this map serves.
    blocks: dotted path from the CausalLM to the ModuleList of decoder blocks.
    sequential: the block's linears, as steps in the order true-sequential quantization takes
        them; linears of one step see the same input (e.g. q, k, v) and are quantized together.
    scaling_pairs: where per-channel input scales can be folded (AWQ, SmoothQuant). A pair whose
        previous linear has a different width than the linears' inputs (v -> o under grouped-query
        attention) is skipped for that model.
    norm_weight_offset: the norms multiply by (offset + weight); Gemma's RMSNorm uses 1 + weight.
    no_clip: linears whose range AWQ's clip search leaves alone (q and k: their error shows in
        attention scores, not in their own outputs, as the AWQ reference reasons).
    bos_per_window: evaluation windows must start with BOS (Gemma degrades badly without it).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    scaling_pairs: tuple[ScalingPair, ...] = ()
    norm_weight_offset: float = 0.0
    no_clip: tuple[str, ...] = ()
    bos_per_window: bool = False

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self) -> list[str]:
        return [name for step in self.sequential for name in step]

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"
