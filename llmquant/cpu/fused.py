"""Linears that read one input tensor (q/k/v, gate/up) run as one matmul with their weights stacked.

At batch-1 decode each call of a CPU op costs a fixed few tens of microseconds beside its arithmetic
(dispatch, the dtype conversions around a packed op, thread wake-up), and a 135M model makes 210
linear calls per token: stacking q/k/v and gate/up makes that 120. Which linears share an input comes
from the model's architecture map: the readers of one scaling pair's `previous` (its norm), routed
experts excepted (each reads its own tokens). The transformers modules still call each projection
on its own, so the first member called computes every member's output, keeps them with the input
tensor itself (so its identity cannot be reused while kept) and its version, and each other member
takes its slice if it is called with that same, unchanged tensor; once every member has taken its
output the slot is emptied. A member called with any other input computes the stacked matmul again
(correct, at the cost of the other members' columns), which declared maps do not cause.
"""
from __future__ import annotations

import torch


def stacked_bias(modules, dtype: torch.dtype) -> torch.Tensor | None:
    """The members' biases end to end in `dtype` (zeros for a member without one), or None if none has one."""
    if all(m.bias is None for m in modules):
        return None
    if len(modules) == 1:
        return modules[0].bias.to(dtype)
    return torch.cat([m.bias.to(dtype) if m.bias is not None else torch.zeros(m.out_features, dtype=dtype)
                      for m in modules])


class SharedInputGroup:
    def __init__(self, kernel, widths: list[int]):
        self.kernel = kernel
        self.widths = widths
        self._input = None
        self._version = None
        self._outputs = None
        self._untaken: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self._input is x and self._version == x._version and index in self._untaken:
            out = self._outputs[index]
            self._untaken.discard(index)
            if not self._untaken:
                self._input = self._outputs = None
            return out
        outputs = self.kernel(x).split(self.widths, dim=-1)
        self._input, self._version, self._outputs = x, x._version, outputs
        self._untaken = set(range(len(self.widths))) - {index}
        return outputs[index]


class MemberKernel:
    """One member's view of its group: called like the member's own kernel."""

    def __init__(self, group: SharedInputGroup, index: int, names: list[str]):
        self.group = group
        self.index = index
        kernel = group.kernel
        share = group.widths[index] / sum(group.widths)
        self.nbytes = round(kernel.nbytes * share)  # the stacked kernel's memory, split by output width
        others = ", ".join(n for i, n in enumerate(names) if i != index)
        self.detail = f"{kernel.detail}; stacked with {others}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, x)
