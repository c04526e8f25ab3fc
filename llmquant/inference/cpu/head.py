"""The output head (lm_head: an unquantized linear, often the tied embeddings) at batch-1 decode.

At one row the head is a matrix-vector product over the whole vocabulary, and with the block linears
4-bit it is the largest read of a decode step: SmolLM2's fp32 head (49152 x 576, 108 MiB) is about twice
the bytes of its 4-bit block linears (its share of a measured decode step: eval/CPU.md). Where every
weight of the head is exactly a float16 number (a checkpoint stored in float16, as llmquant and the GPTQ
/ AWQ tools write them, or bfloat16 within float16's range), a float16 copy computes the product from
half the bytes with the same weights (capability.half_products): through FBGEMM the row and the sums stay
fp32, through torch's float16 gemv (builds without FBGEMM) the row and the logits round to float16 (~2^-11
relative). The copy (vocab x hidden x 2 bytes) is made once beside the weight and again if the
weight changes (freshness.py says when), and let go at the first call off the CPU; calls of more rows,
in another dtype, off the CPU, with gradients, under a kernel backend other than "auto", or where the
float16 product is not the faster (capability.half_gemv_is_faster: measured, it depends on the CPU's
bandwidth per core) run the module's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .capability import half_gemv_is_faster, half_products
from .freshness import Stamp


class HalfGemvHead:
    """Stands in as `linear.forward` (an instance attribute, so state_dict and tied weights are untouched)."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self._copy: tuple[Stamp, object | None] | None = None  # one attribute: threads see old or new

    @property
    def nbytes(self) -> int:
        return 0 if self._copy is None or self._copy[1] is None else self.linear.weight.numel() * 2

    def half_weight(self):
        """The product with the weight in float16 (capability.half_products), or None if the weight is not
        exactly float16 numbers (or not on the CPU)."""
        weight = self.linear.weight
        copy = self._copy
        if copy is None or not copy[0].matches([weight]):
            stamp = Stamp([weight])
            products = None
            if weight.device.type == "cpu":
                with torch.inference_mode(False), torch.no_grad():  # a copy made under inference_mode outlives it
                    half = weight.detach().to(torch.float16)
                    if torch.equal(half.to(weight.dtype), weight.detach()):
                        products = half_products(half)
            copy = self._copy = (stamp, products)
        return copy[1]

    def _traced_half_weight(self):
        # torch.compile cannot trace the freshness check (weak references, data pointers): a traced
        # model uses the copy made when the head was prepared (prepare_for_cpu, or an eager call).
        copy = self._copy
        return None if copy is None else copy[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if x.device.type != "cpu":
            self._copy = None  # moved off the CPU: no CPU copy kept
            return type(linear).forward(linear, x)
        applies = (x.dtype == torch.float32 and x.numel() == x.shape[-1]
                   and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
                   and ops.requested_backend() == "auto")
        half = (self._traced_half_weight() if torch.compiler.is_compiling() else self.half_weight()) if applies else None
        if half is None:
            return type(linear).forward(linear, x)
        out = half(x.reshape(1, -1)).to(x.dtype)
        if linear.bias is not None:
            out = out.add_(linear.bias)
        return out.view(*x.shape[:-1], linear.out_features)


def prepare_output_head(model: nn.Module) -> HalfGemvHead | None:
    """Give the model's output head (get_output_embeddings()) the float16 decode gemv where it applies;
    returns it, or None where the model has no plain linear head or its weights are not float16 numbers."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return None
    installed = head.__dict__.get("forward")
    if not half_gemv_is_faster():  # decided here, not per call: a gemv given before is taken back
        if isinstance(installed, HalfGemvHead):
            del head.forward
        return None
    gemv = installed if isinstance(installed, HalfGemvHead) else HalfGemvHead(head)
    if gemv.half_weight() is None:
        return None
    head.forward = gemv
    return gemv


def describe_head(gemv: HalfGemvHead | None) -> str:
    """For the load log and `llmquant info`: what prepare_output_head gave the head."""
    if gemv is None:
        if not half_gemv_is_faster():
            return "its own forward (a float16 gemv is not the faster on this CPU)"
        return "its own forward (no plain linear head of float16 numbers)"
    return f"float16 weight at one row ({gemv.nbytes / 2**20:.1f} MiB float16 copy)"
