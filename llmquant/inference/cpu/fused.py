"""Linears that read one input tensor (q/k/v, gate/up) run as one matmul with their weights stacked.

At batch-1 decode each call of a CPU op costs a fixed few tens of microseconds beside its arithmetic
(dispatch, the dtype conversions around a packed op, thread wake-up), and a 135M model makes 210
linear calls per token: stacking q/k/v and gate/up makes that 120. Which linears share an input comes
from the model's architecture map: the readers of one scaling pair's `previous` (its norm), routed
experts excepted (each reads its own tokens).

The transformers modules still call each projection on its own, so the first member called computes
every member's output and the others take their slices. The hand-over lives in a scope opened for
one call of the members' closest common parent (the owner: self_attn for q/k/v, mlp for gate/up) by
forward hooks on it, and kept in a context variable, not on any module: the modules hold nothing
between calls, each thread (and asyncio task) sees only its own scopes, so concurrent forwards of one
model never receive each other's outputs, and what a scope holds (the input, the outputs not yet
taken) is let go when the owner's call returns or raises. A member takes a slice only if it is called
with the very tensor the slice was computed from, unchanged (its version, where it has one:
torch.inference_mode() tensors have none, and within one owner call nothing writes the norm's output
in place: AWQ's scaling pairs presume these linears read it as it is), and only once; any other call
computes the stacked matmul again (correct, at the cost of the other members' columns), as does a
member called outside its owner's call.
"""
from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn

from .freshness import version_of

_HOOKED_ATTRIBUTE = "_llmquant_shared_input_scope"


class _Scope:
    """One call of an owner: the outputs its groups computed and not yet handed to every member."""

    __slots__ = ("owner", "slots")

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.slots: dict[SharedInputGroup, _Slot] = {}


class _Slot:
    __slots__ = ("input", "version", "outputs", "untaken")

    def __init__(self, x: torch.Tensor, outputs: tuple[torch.Tensor, ...], untaken: set[int]):
        self.input, self.version, self.outputs, self.untaken = x, version_of(x), outputs, untaken


_scopes: ContextVar[tuple[_Scope, ...]] = ContextVar("llmquant_cpu_shared_input_scopes", default=())


def _open_scope(owner: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return  # a traced forward hands nothing over (SharedInputGroup.output)
    _scopes.set(_scopes.get() + (_Scope(owner),))


def _close_scope(owner: nn.Module, args, output) -> None:
    if torch.compiler.is_compiling():
        return
    scopes = _scopes.get()
    for index in range(len(scopes) - 1, -1, -1):
        if scopes[index].owner is owner:
            _scopes.set(scopes[:index] + scopes[index + 1:])
            return


def open_scopes_around(owner: nn.Module) -> None:
    """Give `owner` the hooks that open a hand-over scope for each of its calls (once per module;
    always_call: an exception in the forward closes it too)."""
    if owner.__dict__.get(_HOOKED_ATTRIBUTE):
        return
    owner.register_forward_pre_hook(_open_scope)
    owner.register_forward_hook(_close_scope, always_call=True)
    owner.__dict__[_HOOKED_ATTRIBUTE] = True


def stacked_bias(modules, dtype: torch.dtype) -> torch.Tensor | None:
    """The members' biases end to end in `dtype` (zeros for a member without one), or None if none has one."""
    if all(m.bias is None for m in modules):
        return None
    if len(modules) == 1:
        return modules[0].bias.to(dtype)
    return torch.cat([m.bias.to(dtype) if m.bias is not None else torch.zeros(m.out_features, dtype=dtype)
                      for m in modules])


class SharedInputGroup:
    """The stacked kernel of some linears and their output widths; immutable once built. `owner`:
    the module whose calls scope the hand-over (None: every member computes the stacked matmul)."""

    def __init__(self, kernel, widths: list[int], owner: nn.Module | None = None):
        self.kernel = kernel
        self.widths = widths
        self.owner = owner

    def _scope(self) -> _Scope | None:
        owner = self.owner
        for scope in reversed(_scopes.get()):
            if scope.owner is owner:
                return scope
        return None

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced, every member computes the stacked matmul: the members' identical calls on one
            # input become one where the compiler merges common subexpressions (inductor with freezing,
            # as llmquant.inference.generation compiles), as the scope makes them one in eager mode.
            return self.kernel(x).split(self.widths, dim=-1)[index]
        scope = self._scope() if self.owner is not None else None
        if scope is None:
            return self.kernel(x).split(self.widths, dim=-1)[index]
        slot = scope.slots.get(self)
        if slot is not None and slot.input is x and index in slot.untaken and slot.version == version_of(x):
            slot.untaken.discard(index)
            if not slot.untaken:
                del scope.slots[self]
            return slot.outputs[index]
        outputs = self.kernel(x).split(self.widths, dim=-1)
        scope.slots[self] = _Slot(x, outputs, set(range(len(self.widths))) - {index})
        return outputs[index]


class MemberKernel:
    """One member's view of its group: called like the member's own kernel."""

    def __init__(self, group: SharedInputGroup, index: int, names: list[str]):
        self.group = group
        self.index = index
        kernel = group.kernel
        others = ", ".join(n for i, n in enumerate(names) if i != index)
        self.detail = f"{kernel.detail}; stacked with {others}"

    @property
    def nbytes(self) -> int:
        """The stacked kernel's memory (what it keeps now), split by output width."""
        return round(self.group.kernel.nbytes * self.group.widths[self.index] / sum(self.group.widths))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)
