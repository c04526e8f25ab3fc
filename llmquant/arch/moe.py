"""Routed experts as one nn.Linear per projection, for calibration, quantization and loading.

transformers 5 keeps a block's experts fused in two 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]), while checkpoints store them per expert (`mlp.experts.<e>.gate_proj.weight`,
...) and transformers fuses them as it loads. The pipeline quantizes nn.Linear modules, one step
at a time, with hooks on their inputs; so each fused experts module is replaced, before anything
runs, by an ExpertList: one small MLP per expert whose linears carry the checkpoint's names and
that computes what the fused module does. A quantized checkpoint then holds one quantized linear
per expert projection under the names transformers' converters and vLLM read, and loading swaps
quantized linears into an ExpertList the same way.

calibrate_all_experts: during calibration every token also runs through every expert, so that
experts the router seldom picks get statistics (as llm-compressor's MoE calibration does); the
block's output still sums only the routed experts' contributions, weighted by the router.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from . import ArchMap, ExpertsMap
from ..errors import UnsupportedArchitectureError

FUSED_PARAMETERS = ("gate_up_proj", "down_proj")


class Expert(nn.Module):
    """down(act(gate(x)) * up(x)), its three linears named as the family's checkpoints name them."""

    def __init__(self, names: ExpertsMap, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn):
        super().__init__()
        self.names = (names.gate, names.up, names.down)
        for name, linear in zip(self.names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertList(nn.ModuleList):
    """The routed experts of one block; called as transformers calls its fused experts module:
    (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]."""

    def __init__(self, experts: list[Expert], calibrate_all_experts: bool = False):
        super().__init__(experts)
        self.calibrate_all_experts = calibrate_all_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if self.calibrate_all_experts:
                # every token reaches the expert's linears (their statistics), only routed ones count
                routed = expert(hidden_states)[token]
            elif token.numel():
                routed = expert(hidden_states[token])
            else:
                continue
            out.index_add_(0, token, (routed * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight if weight.is_meta else weight.detach().clone(), requires_grad=False)
    return linear


def unfused(fused: nn.Module, names: ExpertsMap, where: str) -> ExpertList:
    """An ExpertList computing what a transformers 5 fused experts module computes (meta stays meta)."""
    parameters = dict(fused.named_parameters(recurse=False))
    if set(parameters) != set(FUSED_PARAMETERS) or any(parameters[p].dim() != 3 for p in FUSED_PARAMETERS):
        raise UnsupportedArchitectureError(
            f"{where} ({type(fused).__name__}) holds {', '.join(sorted(parameters)) or 'no parameters'}; llmquant "
            f"splits experts fused as 3-D {' and '.join(FUSED_PARAMETERS)} tensors (no bias, gate rows first)")
    gate_up, down = parameters["gate_up_proj"], parameters["down_proj"]
    intermediate = down.shape[2]
    if gate_up.shape[1] != 2 * intermediate or gate_up.shape[0] != down.shape[0]:
        raise UnsupportedArchitectureError(f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                                           f"{tuple(down.shape)} do not describe [E, 2I, H] and [E, H, I]")
    experts = [Expert(names, _linear(gate_up[e, :intermediate]), _linear(gate_up[e, intermediate:]),
                      _linear(down[e]), fused.act_fn) for e in range(gate_up.shape[0])]
    return ExpertList(experts)


def unfuse_experts(model: nn.Module, arch: ArchMap, calibrate_all_experts: bool = False) -> int:
    """Replace every block's fused experts by an ExpertList (in place; meta stays meta); returns how
    many blocks have experts. An ExpertList already there only gets the calibration option."""
    if arch.experts is None:
        return 0
    count = 0
    for index, block in enumerate(arch.block_list(model)):
        try:
            experts = block.get_submodule(arch.experts.path)
        except AttributeError:
            continue  # a dense block among MoE ones
        if not isinstance(experts, ExpertList):
            experts = unfused(experts, arch.experts, f"{arch.block_prefix(index)}.{arch.experts.path}")
            block.set_submodule(arch.experts.path, experts)
        experts.calibrate_all_experts = calibrate_all_experts
        count += 1
    return count


def set_calibrate_all_experts(model: nn.Module, value: bool) -> None:
    for module in model.modules():
        if isinstance(module, ExpertList):
            module.calibrate_all_experts = value


_EXPERT = re.compile(r"^(?P<block>.+)\.(?P<experts>[^.]+)\.(?P<index>\d+)\.(?P<projection>[^.]+)$")


def expert_coverage(layers) -> dict[str, dict[str, int]]:
    """{experts module: {expert index: calibration tokens its first projection saw}} from the
    pipeline's LayerResults (name, calibration_rows); empty for dense models or runs without data."""
    coverage: dict[str, dict[str, int]] = {}
    for layer in layers:
        rows = layer.get("calibration_rows") if isinstance(layer, dict) else layer.calibration_rows
        name = layer["name"] if isinstance(layer, dict) else layer.name
        match = _EXPERT.match(name)
        if rows is None or match is None or not re.search(r"experts$", match["experts"]):
            continue
        experts = coverage.setdefault(f"{match['block']}.{match['experts']}", {})
        experts.setdefault(match["index"], rows)  # the first projection of the expert (gate, then up)
    return coverage
