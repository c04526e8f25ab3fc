"""ArchMap: the declarative description of one model family that the pipeline needs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchMap:
    """name: family name shown to users.
    model_types: `config.model_type` values this map serves.
    blocks: dotted path from the CausalLM to the ModuleList of decoder blocks.
    sequential: the block's linears, as steps in the order true-sequential quantization takes
        them; linears of one step see the same input (e.g. q, k, v) and are quantized together.
    bos_per_window: evaluation windows must start with BOS (Gemma degrades badly without it).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    bos_per_window: bool = False

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self) -> list[str]:
        return [name for step in self.sequential for name in step]

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"
