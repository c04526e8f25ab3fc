"""R4 (QuaRot / SpinQuant): an online Hadamard rotation of down_proj's input, for checkpoints whose
activations are rounded (W8A8). R1 cannot reach this input: the SwiGLU product act(gate) * up is not
linear, so nothing before down_proj can carry a rotation into it. Instead down_proj's weight takes H on
its input side, W <- W H, before rounding, and every forward multiplies its input by H (x H): x H (W H)^T
= x W^T since H is orthogonal, and both the input the activation grid rounds and the weight have their
outliers spread over all channels.

H is the plain (not sign-randomized, as QuaRot's R4) Hadamard matrix of the intermediate size, scaled
to be orthogonal: Sylvester's for a power of two (compressed-tensors' "hadamard"), else a known small
Hadamard matrix times Sylvester's (SmolLM2's 1536 = 12 x 128, Llama-3-8B's 14336 = 224 x 64), run by
the fast transform (ops.hadamard_transform, O(n log n)). An order no Hadamard matrix is built for
(Qwen2.5-7B's 18944) gets a seeded random orthogonal matrix, multiplied densely, and said in the report.

A checkpoint records it in its quantization_config:
- compressed-tensors formats, H Sylvester's: compressed-tensors' transform_config, as llm-compressor's
  SpinQuantModifier writes R4 (scheme "R4", type "hadamard", down_proj's input online and its weight's
  input side, inverse, fused): the schema its readers know.
- otherwise ("llmquant_online_rotation"): the targets, the order, the matrix's kind and its seed. No
  other loader reads this key; compressed-tensors has no transform type for these matrices
  ("random-hadamard" draws its own signs and small factors). The random orthogonal fallback is not
  stored either: the loader rebuilds it from the seed (QR of a seeded Gaussian matrix in float64), as
  an n x n matrix per linear would outweigh the weights it rotates.
llmquant.load reads both and attaches the rotation to each target (an InputRotation child called by a
forward pre-hook, before the quantized linear rounds its input).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..inference import ops
from ..errors import CheckpointError
from .hadamard import hadamard, hadamard_factors, random_orthogonal

ONLINE_ROTATIONS = ("down_proj",)
TARGETS = {"down_proj": "mlp.down_proj"}  # within a decoder block
OWN_KEY = "llmquant_online_rotation"
TRANSFORM_SCHEME = "R4"
HADAMARD = "hadamard"
RANDOM_ORTHOGONAL = "random orthogonal"


@dataclass(frozen=True)
class OnlineRotation:
    """The rotation of one target's input: its order, and the seed of the random orthogonal fallback."""
    target: str
    size: int
    seed: int

    @property
    def kind(self) -> str:
        return HADAMARD if hadamard_factors(self.size) is not None else RANDOM_ORTHOGONAL

    def matrix(self) -> torch.Tensor:
        """The orthogonal n x n matrix, float64."""
        if self.kind == HADAMARD:
            return hadamard(self.size) / math.sqrt(self.size)
        return random_orthogonal(self.size, self.seed)

    def describe(self) -> str:
        if self.kind == RANDOM_ORTHOGONAL:
            return (f"random orthogonal ({self.size}: no Hadamard matrix built here; dense online product), "
                    f"seed {self.seed}")
        small, power = hadamard_factors(self.size)
        form = f"{small.shape[0]} x {power}" if small is not None else "Sylvester"
        return f"Hadamard ({self.size} = {form}), online on {self.target}'s input"

    def to_dict(self) -> dict:
        return {"target": self.target, "size": self.size, "seed": self.seed, "kind": self.kind}


def online_rotations_for(names: tuple[str, ...], model_config, seed: int) -> tuple[OnlineRotation, ...]:
    """The online rotations asked for (names from ONLINE_ROTATIONS) of a model of this config."""
    return tuple(OnlineRotation(TARGETS[name], model_config.intermediate_size, seed) for name in names)


class InputRotation(nn.Module):
    """x -> x H of a linear's input (attached as its child, called by its forward pre-hook). The small
    Hadamard factor (or the dense fallback) is a non-persistent buffer: it moves with the model and is
    never written to a checkpoint."""

    def __init__(self, rotation: OnlineRotation):
        super().__init__()
        self.size, self.kind = rotation.size, rotation.kind
        factors = hadamard_factors(rotation.size)
        small = factors[0] if factors is not None else None
        self.register_buffer("small", small.float() if small is not None else None, persistent=False)
        self.register_buffer("dense", rotation.matrix().float() if factors is None else None, persistent=False)
        self.scale = 1 / math.sqrt(rotation.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return (x.float() @ self.dense.float()).to(x.dtype)
        return ops.hadamard_transform(x, self.small, self.scale)

    def extra_repr(self) -> str:
        return f"{self.kind}, n={self.size}"


def _rotate_input(module: nn.Module, args):
    return (module.input_rotation(args[0]), *args[1:])


def attach(linear: nn.Module, rotation: OnlineRotation) -> None:
    """Run the rotation on every input of `linear` (a linear carries at most one)."""
    if hasattr(linear, "input_rotation"):
        raise ValueError(f"{rotation.target} already rotates its input")
    if linear.in_features != rotation.size:
        raise CheckpointError(f"the online rotation of {rotation.target}'s input is of order {rotation.size}, "
                              f"the linear takes {linear.in_features} inputs")
    tensors = [*linear.parameters(), *linear.buffers()]
    linear.input_rotation = InputRotation(rotation).to(tensors[0].device if tensors else "cpu")
    # first, so that every other pre-hook (calibration statistics) sees the input the linear computes with
    linear.register_forward_pre_hook(_rotate_input, prepend=True)


@torch.no_grad()
def rotate_input(linear: nn.Linear, rotation: OnlineRotation) -> None:
    """W <- W H (float64), then attach the online x -> x H: the linear computes what it computed."""
    weight = linear.weight.data
    linear.weight.data = (weight.double() @ rotation.matrix()).to(weight.dtype).contiguous()
    attach(linear, rotation)


def with_online_rotation(fmt, config, rotation_description: dict | None) -> dict:
    """The checkpoint's quantization_config in format `fmt`, with what it records of a rotation's online
    part (rotation.Rotation's description)."""
    qc = fmt.quantization_config(config)
    rotations = (rotation_description or {}).get("online") or []
    if not rotations:
        return qc
    sylvester = all(r["kind"] == HADAMARD and r["size"] & (r["size"] - 1) == 0 for r in rotations)
    if qc.get("quant_method") == "compressed-tensors" and sylvester:
        targets = [f"re:.*{re.escape(r['target'].rpartition('.')[2])}$" for r in rotations]
        qc["transform_config"] = {"config_groups": {TRANSFORM_SCHEME: {
            "type": "hadamard",
            "apply": [{"targets": targets, "location": "input", "inverse": False, "ignore": []},
                      {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": None, "precision": "torch.float32"}}}
    else:
        qc[OWN_KEY] = [dict(r) for r in rotations]
    return qc


def without_transform_tensors(tensors: dict, quantization_config: dict) -> dict:
    """The checkpoint's tensors less the online transforms' own matrices (`<linear>.<scheme>_input.weight`,
    as compressed-tensors saves its transform modules): llmquant builds those matrices from the
    transform's type, and the model has no place for them."""
    suffixes = tuple(f".{scheme}_input.{what}" for scheme in
                     ((quantization_config.get("transform_config") or {}).get("config_groups") or {})
                     for what in ("weight", "perm"))
    return {key: tensor for key, tensor in tensors.items() if not key.endswith(suffixes)} if suffixes else tensors


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def attach_from_checkpoint(model: nn.Module, quantization_config: dict) -> list[str]:
    """Attach the online rotations a checkpoint records (either key); the names of the linears rotated.
    Offline (weight_*) transforms of a transform_config are already in the weights and need nothing."""
    found = []  # (target pattern, ignore patterns, rotation for a given order)
    for entry in quantization_config.get(OWN_KEY) or []:
        if entry.get("kind") not in (HADAMARD, RANDOM_ORTHOGONAL) or not isinstance(entry.get("target"), str):
            raise CheckpointError(f"quantization_config.{OWN_KEY}: unknown entry {entry}")
        found.append((entry["target"], [], entry))
    for scheme_name, scheme in ((quantization_config.get("transform_config") or {}).get("config_groups") or {}).items():
        for args in scheme.get("apply", []):
            location = args.get("location")
            if location in ("weight_input", "weight_output"):
                continue
            where = f"transform_config.config_groups.{scheme_name}"
            if location != "input" or args.get("inverse") or scheme.get("type") != "hadamard" \
                    or scheme.get("head_dim") is not None or scheme.get("randomize"):
                raise CheckpointError(f"{where}: llmquant runs online transforms of type hadamard on a linear's "
                                      f"input (not inverse, no head_dim, not randomized); this one is type "
                                      f"{scheme.get('type')!r}, location {location!r}, inverse {args.get('inverse')}, "
                                      f"head_dim {scheme.get('head_dim')}, randomize {scheme.get('randomize')}")
            for target in args.get("targets", []):
                found.append((target, args.get("ignore", []), {"kind": "sylvester", "seed": 0}))
    rotated = []
    for name, module in model.named_modules():
        for target, ignore, entry in found:
            if not _matches(name, target) or any(_matches(name, i) for i in ignore):
                continue
            if not hasattr(module, "in_features"):
                raise CheckpointError(f"an online rotation targets {name}, a {type(module).__name__}, not a linear")
            size = module.in_features
            if entry["kind"] == "sylvester" and size & (size - 1):
                raise CheckpointError(f"transform_config: a hadamard transform of {name}'s input needs a power-of-two "
                                      f"order (compressed-tensors' Sylvester matrix); it takes {size} inputs")
            rotation = OnlineRotation(name, size, int(entry["seed"]))
            if entry["kind"] != "sylvester" and rotation.kind != entry["kind"]:
                raise CheckpointError(f"{name}: the checkpoint's online rotation is {entry['kind']}, but llmquant "
                                      f"builds a {rotation.kind} matrix of order {size}")
            attach(module, rotation)
            rotated.append(name)
    return rotated
