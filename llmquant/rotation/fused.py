"""Rotations before rounding (QuaRot / SpinQuant style), fused into the weights: the model that comes
out is a plain model of the same family, computing the same function, whose weights quantize better.

Pre-norm decoders with RMSNorm (llama, mistral, qwen2 / qwen3): every norm's scale is first folded
into the linears that read it (the norm's weight becomes 1; the final norm's goes into the head).
Then the residual stream is rotated by one orthogonal matrix R1: RMSNorm(x R1) = RMSNorm(x) R1 once
the norms carry no scale, so the embeddings become E R1, every linear that reads the residual
W R1, every linear that writes it R1^T W (its bias b R1), and the head W R1. R2 rotates each
attention head's values: v_proj's rows of each kv head become R2^T W, o_proj's columns of each head
W R2 (attention mixes value vectors linearly, so the rotation passes through it).

R1 and R2 are randomized Hadamard matrices H diag(±1) / sqrt(n) (seeded): outliers spread evenly
over all channels, so every grid fits better. H exists for orders 1, 2 and multiples of 4; orders
that are a power of two times a Paley-constructible order (or a product of two) are built as
Kronecker products (SmolLM2's 576 = 72 x 8: Paley's 72 from the prime 71, Sylvester's 8); any other
order gets a seeded random orthogonal matrix, said in the report.

Rotation is no free win for weight-only rounding. Rounding a rotated weight spreads its error evenly
over all input channels; unrotated, a column of small weights rounds with a small error. A model
whose residual stream carries huge channels on every token that its norms switch off (norm weight
near 0, so the readers' folded columns are near 0) feeds those channels, rotated, into every
column's error: on SmolLM2 (channels 507 and 247, far above the median channel after the norm and
mostly switched off by the post-attention norms) RTN's gate / up projections lose most in output error
with rotation; GPTQ, whose Hessian sees those channels, is the method to pair it with
(eval/RESULTS.md, "Rotations before rounding", has the figures).

R4, the one rotation that cannot be fused (down_proj's input, behind the SwiGLU product), is applied
online as well when asked for (rotation/online.py, folded into down_proj here, block by block).

Tied embeddings are untied: the head must carry the final norm's scale and the embeddings must
not (RMSNorm(x R1) w != (RMSNorm(x) w) R1 unless w is constant), so the checkpoint stores the head
separately (tie_word_embeddings false); loaders read it unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import ArchMap
from ..errors import UnsupportedArchitectureError
from .hadamard import hadamard, random_orthogonal
from .online import OnlineRotation, online_rotations_for, rotate_input

ROTATIONS = ("hadamard",)


def rotation_matrix(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(an orthogonal n x n matrix in float64, what it is): a randomized Hadamard where one exists."""
    generator = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return h * signs[None, :] / math.sqrt(n), f"randomized Hadamard ({n})"
    return random_orthogonal(n, seed), f"random orthogonal ({n}: no Hadamard matrix built here)"


@dataclass
class Rotation:
    residual: torch.Tensor  # R1, hidden x hidden
    head: torch.Tensor  # R2, head_dim x head_dim
    description: dict
    online: tuple[OnlineRotation, ...] = ()  # R4 (rotation/online.py)

    @classmethod
    def for_model(cls, config, seed: int, online: tuple[str, ...] = ()) -> "Rotation":
        hidden = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        residual, what_residual = rotation_matrix(hidden, seed)
        head, what_head = rotation_matrix(head_dim, seed + 1)
        description = {"kind": "hadamard", "seed": seed, "R1 (residual)": what_residual,
                       "R2 (attention values)": what_head}
        rotations = online_rotations_for(online, config, seed + 2)
        if rotations:
            description["R4 (online)"] = "; ".join(r.describe() for r in rotations)
            description["online"] = [r.to_dict() for r in rotations]
        return cls(residual, head, description, rotations)


# Where a family's residual stream is written, and its final norm (the readers are the linears of
# the scaling pairs whose previous operation is a norm).
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
ROTATABLE_FAMILIES = ("llama", "mistral", "qwen2")


def check_rotatable(arch: ArchMap, model_config) -> None:
    if arch.name not in ROTATABLE_FAMILIES or arch.derived or arch.experts is not None:
        raise UnsupportedArchitectureError(
            f"--rotate needs a pre-norm decoder whose every norm feeds linears only (families "
            f"{', '.join(ROTATABLE_FAMILIES)}); {arch.name} is not one (Gemma's (1 + w) norms and post-norms, "
            "OPT's LayerNorm with a bias and mixture-of-experts routers break the algebra)")


def _set(parameter: nn.Parameter, value: torch.Tensor) -> None:
    parameter.data = value.to(parameter.dtype).contiguous()


def _rows_times(weight: torch.Tensor, matrix: torch.Tensor, column_scale: torch.Tensor | None = None,
                rows: int = 8192) -> torch.Tensor:
    """weight (diag(column_scale)) @ matrix in float64, a slab of rows at a time: a 128k-token
    vocabulary in float64 at once would need gigabytes beside the float32 copy."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for start in range(0, weight.shape[0], rows):
        slab = weight[start:start + rows].double()
        if column_scale is not None:
            slab = slab * column_scale[None, :]
        out[start:start + rows] = (slab @ matrix).float()
    return out


def _norm_pairs(arch: ArchMap, block: nn.Module):
    for pair in arch.block_scaling_pairs(block):
        previous = block.get_submodule(pair.previous)
        if not isinstance(previous, nn.Linear):
            yield previous, [block.get_submodule(name) for name in pair.linears]


@torch.no_grad()
def rotate_block(block: nn.Module, arch: ArchMap, rotation: Rotation, model_config) -> None:
    """Fold the block's norms into their readers, then rotate its readers, writers and values."""
    r1 = rotation.residual
    for norm, readers in _norm_pairs(arch, block):
        scale = norm.weight.double()
        for linear in readers:
            _set(linear.weight, linear.weight.double() * scale[None, :] @ r1)
        _set(norm.weight, torch.ones_like(scale))
    for name in RESIDUAL_WRITERS:
        linear = block.get_submodule(name)
        _set(linear.weight, r1.T @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ r1)
    r2 = rotation.head
    head_dim = r2.shape[0]
    value, output = block.get_submodule("self_attn.v_proj"), block.get_submodule("self_attn.o_proj")
    v = value.weight.double().view(-1, head_dim, value.in_features)
    _set(value.weight, torch.einsum("dk,gdi->gki", r2, v).reshape(value.out_features, value.in_features))
    if value.bias is not None:
        _set(value.bias, (value.bias.double().view(-1, head_dim) @ r2).reshape(-1))
    o = output.weight.double().view(output.out_features, -1, head_dim)
    _set(output.weight, (o @ r2).reshape(output.out_features, output.in_features))
    for online in rotation.online:
        rotate_input(block.get_submodule(online.target), online)


@torch.no_grad()
def rotate_outside(model: nn.Module, rotation: Rotation, final_norm: nn.Module) -> None:
    """The embeddings, the final norm (folded into the head) and the head; unties a tied head."""
    r1 = rotation.residual
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_weight = head.weight.detach().clone()  # before the embeddings change: tied, they are one tensor
    _set(embeddings.weight, _rows_times(embeddings.weight, r1))
    if head.weight is embeddings.weight:
        head.weight = nn.Parameter(torch.empty_like(embeddings.weight), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    _set(head.weight, _rows_times(head_weight, r1, final_norm.weight.double()))
    _set(final_norm.weight, torch.ones_like(final_norm.weight))


def final_norm_of(model: nn.Module, arch: ArchMap) -> nn.Module:
    blocks_parent = arch.blocks.rpartition(".")[0]
    return model.get_submodule(f"{blocks_parent}.norm" if blocks_parent else "norm")


def start_rotation(model: nn.Module, arch: ArchMap, seed: int, online: tuple[str, ...] = ()) -> Rotation:
    """Check the family, choose the rotation and rotate everything outside the blocks (which must hold
    their weights; the blocks may still be on the meta device): each block is rotated by rotate_block
    once its weights are there. online: the inputs rotated at run time as well
    (online_rotation.ONLINE_ROTATIONS)."""
    check_rotatable(arch, model.config)
    rotation = Rotation.for_model(model.config, seed, online)
    rotate_outside(model, rotation, final_norm_of(model, arch))
    return rotation


def rotate_model(model: nn.Module, arch: ArchMap, seed: int, online: tuple[str, ...] = ()) -> Rotation:
    """Rotate a whole model held in memory."""
    rotation = start_rotation(model, arch, seed, online)
    for block in arch.block_list(model):
        rotate_block(block, arch, rotation, model.config)
    return rotation
