"""The compressed-tensors FP8 format ("float-quantized"), as llm-compressor writes it and transformers
and vLLM read it.

Per quantized linear `<name>`:
- `<name>.weight`       float8_e4m3fn [out, in];
- `<name>.weight_scale` fp32: [out, 1] per output channel, or [ceil(out / B), ceil(in / B)] per
  B x B block; w = weight * weight_scale (each block's scale spread over its weights);
- `<name>.bias`         optional.
config: quant_method "compressed-tensors", format "float-quantized", one config group targeting
Linear with weights {float, 8 bits, symmetric, strategy channel} and input_activations {float,
8 bits, symmetric, strategy token, dynamic} (llm-compressor's FP8_DYNAMIC), or weights {strategy
block, block_structure [B, B]} and no input_activations (FP8 weight-only, DeepSeek-V3's blocks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .._version import __version__
from ..errors import CheckpointError, ConfigError
from ..grid.fp8 import FP8_DTYPE, Fp8Weight
from ..inference.nn.fp8_linear import Fp8Linear
from .base import FLOAT_DTYPES, CheckpointFormat, check_bias, check_dtype, check_finite, read_int, read_mapping

if TYPE_CHECKING:  # configs arrive as arguments; config.py imports this registry
    from ..config import QuantConfig

TENSOR_SUFFIXES = ("weight", "weight_scale")
FLOAT_FORMATS = ("float-quantized", "naive-quantized")  # llm-compressor names weight-only FP8 naive-quantized


def _scheme(strategy: str, dynamic: bool, block: int = 0) -> dict:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": [block, block] if block else None, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def _weights_and_inputs(quantization_config: dict) -> tuple[dict, dict | None]:
    groups = read_mapping(quantization_config, "config_groups")
    if len(groups) != 1:
        raise CheckpointError(f"llmquant reads compressed-tensors FP8 with one config group, found {len(groups)}")
    group = next(iter(groups.values()))
    if not isinstance(group, dict):
        raise CheckpointError(f"quantization_config.config_groups holds {group!r}, not a mapping")
    inputs = group.get("input_activations")
    if inputs is not None and not isinstance(inputs, dict):
        raise CheckpointError(f"config_groups.input_activations must be a mapping, got {inputs!r}")
    return read_mapping(group, "weights", where="config_groups"), inputs


class CompressedTensorsFp8Format(CheckpointFormat):
    name = "compressed-tensors-fp8"
    bits = (8,)
    tensor_suffixes = TENSOR_SUFFIXES
    marker_suffix = "weight_scale"
    holds_activation_quantization = False  # the int8 W8A8 methods' question; FP8 has its own methods
    holds_codebook_weights = False
    holds_fp8_weights = True

    @staticmethod
    def reads(quant_method: str) -> bool:
        return False  # compressed-tensors is read by content: see reads_config

    @staticmethod
    def reads_config(quantization_config: dict) -> bool:
        if str(quantization_config.get("quant_method", "")).lower() != "compressed-tensors":
            return False
        groups = quantization_config.get("config_groups")
        # a malformed config_groups is left to the compressed-tensors format to name
        return isinstance(groups, dict) and quantization_config.get("format") in FLOAT_FORMATS and any(
            isinstance(group, dict) and isinstance(group.get("weights"), dict) and group["weights"].get("type") == "float"
            for group in groups.values())

    @staticmethod
    def check_config(config: QuantConfig) -> None:
        if config.bits != 8:
            raise ConfigError(f"FP8 is an 8-bit type; got bits={config.bits}")

    @staticmethod
    def grid_min_zero(config: QuantConfig) -> int:
        return 0

    @staticmethod
    def check_layer(name: str, out_features: int, in_features: int, config: QuantConfig) -> None:
        pass  # e4m3 values need no packing; partial blocks at the edges are allowed

    @staticmethod
    def pack(quantized: Fp8Weight, config: QuantConfig) -> dict[str, torch.Tensor]:
        if not isinstance(quantized, Fp8Weight):
            raise ValueError("the compressed-tensors FP8 format stores weights quantized on the FP8 grid")
        return {"weight": quantized.codes.to(FP8_DTYPE).contiguous(),
                "weight_scale": quantized.scale.to(torch.float32).contiguous()}

    @staticmethod
    def quantization_config(config: QuantConfig, extra: dict | None = None) -> dict:
        block = config.method == "fp8-block"
        qc = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": _scheme("block", False, config.group_size) if block else _scheme("channel", False),
                    "input_activations": None if block else _scheme("token", True),
                    "output_activations": None,
                    "format": "float-quantized",
                }
            },
            "ignore": ["lm_head", *config.modules_to_not_convert],
            "kv_cache_scheme": None,
            "llmquant": {"version": __version__, "method": config.method},
        }
        qc.update(extra or {})
        return qc

    @classmethod
    def build_linear(cls, name: str, quantization_config: dict, shapes: dict[str, tuple], has_bias: bool,
                     in_features: int, out_features: int, dtype: torch.dtype) -> Fp8Linear:
        weights, inputs = _weights_and_inputs(quantization_config)
        strategy = weights.get("strategy")
        read_int(weights, "num_bits", allowed=(8,), where="weights")
        if weights.get("type") != "float" or not weights.get("symmetric") \
                or strategy not in ("channel", "block"):
            raise CheckpointError(f"llmquant reads FP8 weights per channel or per block; this checkpoint has {weights}")
        if strategy == "block":
            structure = weights.get("block_structure") or []
            if not isinstance(structure, (list, tuple)) or len(structure) != 2 or structure[0] != structure[1] or inputs:
                raise CheckpointError(f"llmquant reads FP8 block weights with square blocks and unquantized "
                                      f"activations; found block_structure {structure}, input_activations {inputs}")
            block = read_int({"block_structure": structure[0]}, "block_structure", where="weights")
            if block < 1:
                raise CheckpointError(f"weights.block_structure must be positive, got {structure}")
            scale_shape = (-(-out_features // block), -(-in_features // block))
        else:
            if not inputs or (inputs.get("type"), inputs.get("num_bits"), inputs.get("strategy"),
                              bool(inputs.get("dynamic"))) != ("float", 8, "token", True):
                raise CheckpointError(f"llmquant reads per-channel FP8 weights with dynamic per-token FP8 "
                                      f"activations (FP8_DYNAMIC); found input_activations {inputs}")
            block, scale_shape = 0, (out_features, 1)
        expected = {"weight": (out_features, in_features), "weight_scale": scale_shape}
        for suffix, shape in expected.items():
            if suffix not in shapes:
                raise CheckpointError(f"{name}: missing tensor {name}.{suffix}")
            if tuple(shapes[suffix]) != shape:
                raise CheckpointError(f"{name}.{suffix} has shape {tuple(shapes[suffix])}, expected {shape}")
        return Fp8Linear(in_features, out_features, block=block, dynamic_activations=not block, bias=has_bias,
                         dtype=dtype)

    @staticmethod
    def check_tensors(name: str, module: Fp8Linear, tensors: dict[str, torch.Tensor]) -> None:
        weight = tensors["weight"]
        check_dtype(f"{name}.weight", weight, FP8_DTYPE)
        # e4m3fn has no inf; its NaNs are S.1111.111, so as int8 a positive one is the maximum 127 and
        # as uint8 a negative one the maximum 255: two reductions over the weight, no temporary.
        if weight.numel() and (int(weight.view(torch.int8).max()) == 127 or int(weight.view(torch.uint8).max()) == 255):
            codes = weight.view(torch.uint8)
            nans = (codes & 0x7F) == 0x7F
            raise CheckpointError(f"{name}.weight holds {int(nans.sum())} NaN codes (the first at "
                                  f"{[int(i) for i in nans.nonzero()[0]]}); FP8 weights must be finite")
        check_dtype(f"{name}.weight_scale", tensors["weight_scale"], *FLOAT_DTYPES)
        check_finite(f"{name}.weight_scale", tensors["weight_scale"])
        check_bias(name, tensors, module.out_features)
