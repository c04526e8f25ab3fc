"""What every quantized linear shares: its matmul is one op of llmquant.inference.ops, called with the
layer's tensors; the layer never chooses a backend.

A device whose fastest path needs the tensors in another layout (the CPU: llmquant.inference.cpu)
converts them once into a prepared weight that the layer owns, in plain attributes declared here, not
buffers: state_dict() and saving see only the checkpoint's tensors, and moving the layer to another
device or dtype carries no layout made for one device along.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops


class QuantizedLinear(nn.Module):
    """Subclasses name their op (`op_name`) and give its arguments after x (`op_arguments`)."""

    op_name: str

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # The weight a device backend prepared from this layer's tensors (llmquant.inference.cpu's
        # PreparedWeight), or None; the backend checks at each call that it still matches them.
        self.prepared = None
        # False: every call runs the op from the tensors, nothing is prepared (a base that trains
        # adapters keeps the packed size in memory).
        self.prepare_weights = True
        # Whether a prepared weight may hold a dequantized copy: granted by the memory bound of
        # llmquant.inference.cpu.prepare_for_cpu, and kept when the prepared weight is dropped.
        self.dequantized_copy_allowed = False
        self.register_load_state_dict_post_hook(_drop_prepared)

    def op_arguments(self) -> tuple:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.call_layer(self, x)


def _drop_prepared(layer: QuantizedLinear, incompatible_keys) -> None:
    # A load_state_dict may write in place into tensors whose writes no freshness check sees
    # (inference tensors), or change plain attributes a preparation read (a 4-bit layer's block size).
    layer.prepared = None
