"""A linear layer holding bitsandbytes-packed NF4 / FP4 weights; the matmul is an op.

Its state dict uses bitsandbytes' names (`weight`, `weight.absmax`, `weight.quant_map`, ...,
`weight.quant_state.bitsandbytes__nf4`): the dotted names cannot be buffer names, so saving and
loading map them onto buffers here, and loading reads the block size and the double-quantization
offset from the quant_state JSON.
"""
from __future__ import annotations

import json
import math

import torch

from .. import ops
from .base import QuantizedLinear
from ...errors import CheckpointError
from ...grid.codebook import BLOCKSIZES, dequantize_nested_absmax

# bitsandbytes state-dict suffix (after "weight.") -> buffer name.
_BUFFERS = {"absmax": "absmax", "quant_map": "quant_map", "nested_absmax": "nested_absmax",
            "nested_quant_map": "nested_quant_map"}


WEIGHT_DTYPES = ("float16", "bfloat16", "float32")


def quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


class BnB4bitLinear(QuantizedLinear):
    op_name = "codebook4_linear"

    def __init__(self, in_features: int, out_features: int, quant_type: str, blocks: int, nested_blocks: int = 0,
                 bias: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__(in_features, out_features)
        self.quant_type = quant_type
        self.blocksize: int | None = None
        self.nested_offset: float | None = None
        self.nested_blocksize: int | None = None
        nested = nested_blocks > 0
        self.register_buffer("weight", torch.empty(-(-in_features * out_features // 2), 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8 if nested else torch.float32, device=device))
        self.register_buffer("quant_map", torch.empty(16, dtype=torch.float32, device=device))
        if nested:
            self.register_buffer("nested_absmax", torch.empty(nested_blocks, dtype=torch.float32, device=device))
            self.register_buffer("nested_quant_map", torch.empty(256, dtype=torch.float32, device=device))
        else:
            self.nested_absmax = self.nested_quant_map = None
        self.register_buffer("quant_state", torch.empty(0, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def block_absmax(self) -> torch.Tensor:
        """fp32 per-block scales (dequantized from 8 bits under double quantization)."""
        if not self.nested:
            return self.absmax
        return dequantize_nested_absmax(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset,
                                        self.nested_blocksize)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_4bit(self.weight, self.block_absmax(), self.quant_map, self.blocksize,
                                   (self.out_features, self.in_features)).to(dtype)

    def op_arguments(self) -> tuple:
        nested = (self.nested_absmax, self.nested_quant_map, self.nested_offset, self.nested_blocksize) \
            if self.nested else None
        return ops.codebook4_arguments(self.weight, self.absmax, self.quant_map, nested, self.blocksize,
                                       (self.out_features, self.in_features), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        for suffix, buffer in _BUFFERS.items():
            if getattr(self, buffer) is not None:
                destination[f"{prefix}weight.{suffix}"] = getattr(self, buffer)
        destination[f"{prefix}weight.{quant_state_key(self.quant_type)}"] = self.quant_state
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        name = prefix.rstrip(".")
        renamed = {"weight": "weight", "bias": "bias", f"weight.{quant_state_key(self.quant_type)}": "quant_state"}
        renamed.update({f"weight.{suffix}": buffer for suffix, buffer in _BUFFERS.items()})
        for key, buffer in renamed.items():
            if getattr(self, buffer) is None:
                continue
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            value = state_dict[prefix + key]
            current = getattr(self, buffer)
            if buffer == "quant_state":  # JSON bytes: any length
                current = torch.empty(value.shape, dtype=torch.uint8)
            if value.shape != current.shape or value.dtype != current.dtype:
                raise CheckpointError(f"{name}.{key} is {value.dtype} {tuple(value.shape)}, expected "
                                      f"{current.dtype} {tuple(current.shape)}")
            if local_metadata.get("assign_to_params_buffers", False) or buffer == "quant_state":
                setattr(self, buffer, value)
            else:
                with torch.no_grad():
                    current.copy_(value)
        if prefix + f"weight.{quant_state_key(self.quant_type)}" in state_dict:
            self.read_quant_state(name, self.quant_state)

    def read_quant_state(self, name: str, raw: torch.Tensor) -> None:
        """Take the block size and double-quantization settings from the quant_state JSON bytes
        `raw`, checked against this linear's shape and absmax tensors (the format checks a
        checkpoint's with it before loading, under the linear's full name)."""
        try:
            state = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; "[[[[..." recurses
            raise CheckpointError(f"{name}: the quant_state tensor is not valid JSON: {exc}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{name}: the quant_state tensor is not a JSON object")
        shape, blocksize = state.get("shape"), state.get("blocksize")
        if state.get("quant_type") != self.quant_type:
            raise CheckpointError(f"{name}: quant_state says {state.get('quant_type')!r}, the config {self.quant_type!r}")
        if shape != [self.out_features, self.in_features]:
            raise CheckpointError(f"{name}: quant_state shape {shape} is not the model's "
                                  f"[{self.out_features}, {self.in_features}]")
        if type(blocksize) is not int or blocksize not in BLOCKSIZES or -(-self.in_features * self.out_features // blocksize) != self.absmax.numel():
            raise CheckpointError(f"{name}: quant_state blocksize {blocksize!r} disagrees with "
                                  f"{self.absmax.numel()} absmax values")
        # bitsandbytes rebuilds the weight in this dtype (getattr(torch, name)); it must be one it quantizes
        if state.get("dtype") not in WEIGHT_DTYPES:
            raise CheckpointError(f"{name}: quant_state dtype {state.get('dtype')!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        self.blocksize = blocksize
        if self.nested:
            offset, nested_blocksize = state.get("nested_offset"), state.get("nested_blocksize")
            # JSON spells NaN and Infinity too, and the offset is added to every block's absmax
            if type(offset) not in (int, float) or not math.isfinite(offset) or type(nested_blocksize) is not int \
                    or nested_blocksize not in BLOCKSIZES \
                    or -(-self.absmax.numel() // nested_blocksize) != self.nested_absmax.numel():
                raise CheckpointError(f"{name}: quant_state nested_offset {offset!r} / nested_blocksize "
                                      f"{nested_blocksize!r} do not describe the nested absmax tensors")
            if state.get("nested_dtype") != "float32":
                raise CheckpointError(f"{name}: quant_state nested_dtype {state.get('nested_dtype')!r}; "
                                      "bitsandbytes stores the nested absmax as float32")
            self.nested_offset, self.nested_blocksize = float(offset), nested_blocksize

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.nested}, bias={self.bias is not None}")
