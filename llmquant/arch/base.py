"""ArchMap: the declarative description of one model family that the pipeline needs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UnsupportedArchitectureError

# In a map's names, this part stands for every index of the ModuleList before it
# ("mlp.experts.*.gate_proj": the gate projection of each expert).
EVERY_INDEX = ".*."


@dataclass(frozen=True)
class ScalingPair:
    """An operation whose output channels feed the inputs of `linears` one to one, with nothing
    between them that a per-channel scale does not pass through: dividing its output channel j
    by s_j and multiplying input column j of each linear by s_j leaves the function unchanged.
    previous: a norm (RMSNorm / LayerNorm weight) or a linear (its rows are divided).
    linears: every reader of that output, also those left unquantized (a router, a shared expert's
    gate): they are rescaled too, else the function would change. The first one's input statistics
    are the group's, so a reader that sees every token (the router) comes first.
    Names may hold EVERY_INDEX; a previous with it pairs index by index (expert e's up -> its down)."""

    previous: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ExpertsMap:
    """Where a block's routed experts live, and the names of each expert's projections as
    checkpoints store them (`<path>.<e>.<gate>.weight`). transformers 5 fuses them into two 3-D
    parameters, `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I]; moe.py
    turns those into one nn.Linear per projection under these names."""

    path: str = "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class ArchMap:
    """name: family name shown to users.
    model_types: `config.model_type` values this map serves.
    blocks: dotted path from the CausalLM to the ModuleList of decoder blocks.
    sequential: the block's linears, as steps in the order true-sequential quantization takes
        them; linears of one step see the same input (e.g. q, k, v) and are quantized together.
        Names may hold EVERY_INDEX (every expert).
    scaling_pairs: where per-channel input scales can be folded (AWQ, SmoothQuant). A pair whose
        previous linear has a different width than the linears' inputs (v -> o under grouped-query
        attention), or one of whose modules a block lacks (dense and MoE blocks in one model), is
        skipped for that block.
    norm_weight_offset: the norms multiply by (offset + weight); Gemma's RMSNorm uses 1 + weight.
    no_clip: linears whose range AWQ's clip search leaves alone (q and k: their error shows in
        attention scores, not in their own outputs, as the AWQ reference reasons).
    bos_per_window: evaluation windows must start with BOS (Gemma degrades badly without it).
    optional: names of `sequential` that some blocks lack (a dense MLP in some blocks, experts in
        the others); every other name must exist in every block, and every step must keep a linear.
    experts: the routed experts, for mixture-of-experts families.
    full_precision: linears inside a block that stay in floating point (a shared expert's gate,
        one output wide); checkpoint configs list them as not converted.
    stored_names: (module path part, checkpoint key part) pairs where checkpoints name a module
        otherwise than the transformers module tree (Mixtral stores `block_sparse_moe`, transformers 5
        builds `mlp`).
    derived: the map was derived from the module tree, not declared (see arch/derived.py).
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    sequential: tuple[tuple[str, ...], ...]
    scaling_pairs: tuple[ScalingPair, ...] = ()
    norm_weight_offset: float = 0.0
    no_clip: tuple[str, ...] = ()
    bos_per_window: bool = False
    optional: tuple[str, ...] = ()
    experts: ExpertsMap | None = None
    full_precision: tuple[str, ...] = ()
    stored_names: tuple[tuple[str, str], ...] = ()
    derived: bool = False

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self) -> list[str]:
        return [name for step in self.sequential for name in step]

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks}.{index}"

    def steps(self, block: nn.Module) -> tuple[tuple[str, ...], ...]:
        """`sequential` as it applies to one block: indices expanded, optional names it lacks dropped."""
        steps = []
        for step in self.sequential:
            names = tuple(name for pattern in step for name in self._expand(block, pattern))
            if not names:
                raise UnsupportedArchitectureError(f"{self.name} map: a block has none of the linears {', '.join(step)}")
            steps.append(names)
        return tuple(steps)

    def block_linear_names(self, block: nn.Module) -> list[str]:
        return [name for step in self.steps(block) for name in step]

    def block_scaling_pairs(self, block: nn.Module) -> list[ScalingPair]:
        """The scaling pairs of one block with indices expanded, those it lacks a module of left out."""
        pairs = []
        for pair in self.scaling_pairs:
            if EVERY_INDEX in pair.previous:
                head = pair.previous.partition(EVERY_INDEX)[0]
                count = len(block.get_submodule(head)) if _has(block, head) else 0
                expanded = [ScalingPair(pair.previous.replace("*", str(e)),
                                        tuple(name.replace("*", str(e)) for name in pair.linears)) for e in range(count)]
            else:
                expanded = [ScalingPair(pair.previous, tuple(name for pattern in pair.linears
                                                             for name in _indexed(block, pattern)))]
            pairs.extend(p for p in expanded if p.linears and all(_has(block, n) for n in (p.previous, *p.linears)))
        return pairs

    def full_precision_names(self, model: nn.Module) -> list[str]:
        """Full names of the `full_precision` linears of every block."""
        return [f"{self.block_prefix(i)}.{name}" for i, block in enumerate(self.block_list(model))
                for name in self.full_precision if _has(block, name)]

    def stored_name(self, name: str) -> str:
        """The checkpoint key of a module path (or of one of its tensors)."""
        for module_part, stored_part in self.stored_names:
            name = name.replace(module_part, stored_part)
        return name

    def module_name(self, key: str) -> str:
        """The module path of a checkpoint key: stored_name undone."""
        for module_part, stored_part in self.stored_names:
            key = key.replace(stored_part, module_part)
        return key

    def _expand(self, block: nn.Module, pattern: str) -> list[str]:
        if pattern in self.optional and not _indexed_exists(block, pattern):
            return []
        names = _indexed(block, pattern)
        for name in names:
            if not _has(block, name):
                raise UnsupportedArchitectureError(f"{self.name} map names {name}, which this model's blocks lack")
        return names


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _indexed_exists(block: nn.Module, pattern: str) -> bool:
    head = pattern.partition(EVERY_INDEX)[0] if EVERY_INDEX in pattern else pattern
    return _has(block, head)


def _indexed(block: nn.Module, pattern: str) -> list[str]:
    """The names a pattern stands for in one block (the pattern itself when it has no index)."""
    if EVERY_INDEX not in pattern:
        return [pattern]
    head, _, tail = pattern.partition(EVERY_INDEX)
    if not _has(block, head):
        return []
    container = block.get_submodule(head)
    if not isinstance(container, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{head} is a {type(container).__name__}, not a list of modules: "
                                           "fused experts are split into one linear each before quantization")
    return [f"{head}.{e}.{tail}" for e in range(len(container))]
