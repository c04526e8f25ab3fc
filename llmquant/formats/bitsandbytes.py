"""The bitsandbytes 4-bit (NF4 / FP4) serialization, as transformers saves and loads it with
`BitsAndBytesConfig(load_in_4bit=True)`.

Per quantized linear `<name>` (weight [out, in], n = out * in values, B = ceil(n / blocksize)):
- `<name>.weight`                uint8 [ceil(n / 2), 1]: codes of the row-major flattened weight,
                                 two per byte, the first in the high nibble (an odd count is padded
                                 with the code of 0.0);
- `<name>.weight.absmax`         fp32 [B], or uint8 [B] under double quantization;
- `<name>.weight.quant_map`      fp32 [16]: the 4-bit table;
- `<name>.weight.nested_absmax`, `<name>.weight.nested_quant_map` fp32 [ceil(B / 256)], [256]:
                                 only under double quantization;
- `<name>.weight.quant_state.bitsandbytes__<nf4|fp4>` uint8: JSON bytes of quant_type, blocksize,
                                 dtype, shape (and nested_blocksize, nested_dtype, nested_offset);
- `<name>.bias`                  optional.
config: quant_method "bitsandbytes", load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant,
bnb_4bit_compute_dtype, bnb_4bit_quant_storage "uint8", llm_int8_skip_modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import json

import torch

from .._version import __version__
from ..errors import CheckpointError
from ..grid.codebook import BLOCKSIZES, QUANT_TYPES, code_of_zero, dynamic_table
from ..inference.nn.bnb4bit_linear import BnB4bitLinear, quant_state_key
from .base import CheckpointFormat, RoundedWeight, check_bias, check_dtype, check_finite, read_str

if TYPE_CHECKING:  # configs arrive as arguments; config.py imports this registry
    from ..config import QuantConfig

TENSOR_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                   *(f"weight.{quant_state_key(t)}" for t in QUANT_TYPES))


def pack_codes(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """uint8 [ceil(n / 2), 1]: flattened codes two per byte, the first in the high nibble."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.tensor([pad_code], dtype=torch.uint8, device=flat.device)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1).contiguous()


def quant_state_bytes(state: dict, device=None) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8, device=device)


class BitsAndBytesFormat(CheckpointFormat):
    name = "bitsandbytes"
    bits = (4,)
    tensor_suffixes = TENSOR_SUFFIXES
    marker_suffix = "weight.absmax"
    holds_activation_quantization = False
    holds_codebook_weights = True

    @staticmethod
    def reads(quant_method: str) -> bool:
        return quant_method == "bitsandbytes"

    @staticmethod
    def check_config(config: QuantConfig) -> None:
        pass  # QuantConfig pairs codebook methods with this format (holds_codebook_weights)

    @staticmethod
    def grid_min_zero(config: QuantConfig) -> int:
        return 0

    @staticmethod
    def check_layer(name: str, out_features: int, in_features: int, config: QuantConfig) -> None:
        pass  # blocks run over the flattened weight: any shape packs

    @staticmethod
    def pack(quantized: RoundedWeight, config: QuantConfig) -> dict[str, torch.Tensor]:
        state = {"quant_type": quantized.quant_type, "blocksize": quantized.blocksize, "dtype": config.dtype,
                 "shape": list(quantized.codes.shape)}
        tensors = {"weight": pack_codes(quantized.codes, code_of_zero(quantized.table))}
        if quantized.nested is None:
            tensors["weight.absmax"] = quantized.absmax.float().contiguous()
        else:
            tensors["weight.absmax"] = quantized.nested.codes.contiguous()
            state.update({"nested_blocksize": quantized.nested.blocksize, "nested_dtype": "float32",
                          "nested_offset": quantized.nested.offset})
        tensors["weight.quant_map"] = quantized.table.clone()
        if quantized.nested is not None:
            tensors["weight.nested_absmax"] = quantized.nested.nested_absmax.float().contiguous()
            tensors["weight.nested_quant_map"] = dynamic_table().to(quantized.codes.device, copy=True)
        tensors[f"weight.{quant_state_key(quantized.quant_type)}"] = quant_state_bytes(state, quantized.codes.device)
        return tensors

    @staticmethod
    def quantization_config(config: QuantConfig, extra: dict | None = None) -> dict:
        qc = {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": False,
            "_load_in_4bit": True,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": ["lm_head", *config.modules_to_not_convert],
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": config.method,
            "bnb_4bit_use_double_quant": config.double_quant,
            "bnb_4bit_compute_dtype": config.dtype,
            "bnb_4bit_quant_storage": "uint8",
            "llmquant": {"version": __version__, "blocksize": config.group_size},
        }
        qc.update(extra or {})
        return qc

    @classmethod
    def build_linear(cls, name: str, quantization_config: dict, shapes: dict[str, tuple], has_bias: bool,
                     in_features: int, out_features: int, dtype: torch.dtype) -> BnB4bitLinear:
        """An empty BnB4bitLinear for the tensors found; the block size and double-quantization
        offset are read from the quant_state tensor when the state dict is loaded."""
        where = f"{name}: quantization_config"
        quant_type = read_str(quantization_config, "bnb_4bit_quant_type", default="fp4", where=where)
        if not quantization_config.get("load_in_4bit", quantization_config.get("_load_in_4bit")):
            raise CheckpointError("llmquant reads bitsandbytes 4-bit checkpoints (load_in_4bit); this one is not")
        if quant_type not in QUANT_TYPES:
            raise CheckpointError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if read_str(quantization_config, "bnb_4bit_quant_storage", default="uint8", where=where) != "uint8":
            raise CheckpointError("llmquant reads bnb_4bit_quant_storage uint8 only")
        nested = "weight.nested_absmax" in shapes
        required = ["weight", "weight.absmax", "weight.quant_map", f"weight.{quant_state_key(quant_type)}"]
        if nested:
            required.append("weight.nested_quant_map")
        missing = [s for s in required if s not in shapes]
        if missing:
            raise CheckpointError(f"{name}: missing tensors {', '.join(name + '.' + s for s in missing)}")
        n = out_features * in_features
        blocks = shapes["weight.absmax"][0] if len(shapes["weight.absmax"]) == 1 else -1
        expected = {"weight": (-(-n // 2), 1), "weight.quant_map": (16,)}
        if nested:
            expected["weight.nested_quant_map"] = (256,)
        for suffix, shape in expected.items():
            if tuple(shapes[suffix]) != shape:
                raise CheckpointError(f"{name}.{suffix} has shape {tuple(shapes[suffix])}, expected {shape} for a "
                                      f"{in_features}->{out_features} linear")
        if not any(-(-n // b) == blocks for b in BLOCKSIZES):
            raise CheckpointError(f"{name}.weight.absmax has shape {tuple(shapes['weight.absmax'])}, which matches "
                                  f"no block size of a {in_features}->{out_features} linear")
        nested_blocks = shapes["weight.nested_absmax"][0] if nested else 0
        return BnB4bitLinear(in_features, out_features, quant_type, blocks=blocks, nested_blocks=nested_blocks,
                             bias=has_bias, dtype=dtype)

    @staticmethod
    def check_tensors(name: str, module: BnB4bitLinear, tensors: dict[str, torch.Tensor]) -> None:
        """Every byte of `weight` holds two valid codes of the 16-entry table, and every double-quantized
        absmax byte indexes the 256-entry nested table: dtypes alone keep lookups in range."""
        check_dtype(f"{name}.weight", tensors["weight"], torch.uint8)
        state_key = f"weight.{quant_state_key(module.quant_type)}"
        check_dtype(f"{name}.{state_key}", tensors[state_key], torch.uint8)
        if tensors[state_key].dim() != 1:
            raise CheckpointError(f"{name}.{state_key} has shape {tuple(tensors[state_key].shape)}; "
                                  "it holds JSON bytes, one dimension")
        module.read_quant_state(name, tensors[state_key])
        floats = ["weight.quant_map"]
        if module.nested:
            check_dtype(f"{name}.weight.absmax", tensors["weight.absmax"], torch.uint8)
            floats += ["weight.nested_absmax", "weight.nested_quant_map"]
        else:
            floats.append("weight.absmax")
        for suffix in floats:  # bitsandbytes stores all of these in fp32
            check_dtype(f"{name}.{suffix}", tensors[suffix], torch.float32)
            check_finite(f"{name}.{suffix}", tensors[suffix])
        check_bias(name, tensors, module.out_features)
