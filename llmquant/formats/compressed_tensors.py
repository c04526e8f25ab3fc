"""The compressed-tensors int8 W8A8 format (llm-compressor's "int-quantized"), as vLLM serves it.

Per quantized linear `<name>`:
- `<name>.weight`       int8 [out, in]: symmetric codes, w = weight * weight_scale;
- `<name>.weight_scale` fp32 [out, 1]: one scale per output channel;
- `<name>.input_scale`  fp32 [1]: static activation scale (only with static activations);
- `<name>.bias`         optional.
config: quant_method "compressed-tensors", format "int-quantized", one config group targeting
Linear with weights {int, 8 bits, symmetric, strategy channel} and input_activations
{int, 8 bits, symmetric, strategy token, dynamic true} or {strategy tensor, dynamic false}.
"""
from __future__ import annotations

import torch

from ..config import PER_CHANNEL, QuantConfig
from ..errors import CheckpointError
from ..nn.w8a8_linear import W8A8Linear
from .base import CheckpointFormat, RoundedWeight, read_int, read_mapping, read_str

TENSOR_SUFFIXES = ("weight", "weight_scale", "input_scale")
SYMMETRIC_INT8_ZERO = 128  # the affine grid's zero point for symmetric 8-bit codes 0..255


def _scheme(strategy: str, dynamic: bool, observer: str) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": observer,
            "observer_kwargs": {}}


class CompressedTensorsFormat(CheckpointFormat):
    name = "compressed-tensors"
    bits = (8,)
    tensor_suffixes = TENSOR_SUFFIXES
    marker_suffix = "weight_scale"
    holds_activation_quantization = True
    holds_codebook_weights = False

    @staticmethod
    def reads(quant_method: str) -> bool:
        return quant_method == "compressed-tensors"

    @staticmethod
    def check_config(config: QuantConfig) -> None:
        pass  # QuantConfig already holds it to symmetric int8 per channel with quantized activations

    @staticmethod
    def grid_min_zero(config: QuantConfig) -> int:
        return 0

    @staticmethod
    def check_layer(name: str, out_features: int, in_features: int, config: QuantConfig) -> None:
        pass  # int8 codes need no packing

    @staticmethod
    def pack(quantized: RoundedWeight, config: QuantConfig) -> dict[str, torch.Tensor]:
        if quantized.bits != 8 or quantized.group_size != PER_CHANNEL or not bool((quantized.zero == SYMMETRIC_INT8_ZERO).all()):
            raise ValueError("compressed-tensors int8 needs symmetric 8-bit codes per output channel")
        tensors = {
            "weight": (quantized.codes.to(torch.int16) - SYMMETRIC_INT8_ZERO).to(torch.int8).contiguous(),
            "weight_scale": quantized.scale.to(torch.float32).reshape(-1, 1).contiguous(),
        }
        if quantized.input_scale is not None:
            tensors["input_scale"] = quantized.input_scale.to(torch.float32).reshape(1).contiguous()
        return tensors

    @staticmethod
    def quantization_config(config: QuantConfig, extra: dict | None = None) -> dict:
        from .. import __version__

        static = config.act_quant == "static"
        qc = {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": _scheme("channel", False, "minmax"),
                    "input_activations": _scheme("tensor", False, config.observer) if static
                    else _scheme("token", True, "memoryless"),
                    "output_activations": None,
                }
            },
            "ignore": ["lm_head", *config.modules_to_not_convert],
            "kv_cache_scheme": None,
            "llmquant": {"version": __version__, "method": config.method, "alpha": config.alpha},
        }
        qc.update(extra or {})
        return qc

    @classmethod
    def build_linear(cls, name: str, quantization_config: dict, shapes: dict[str, tuple], has_bias: bool,
                     in_features: int, out_features: int, dtype: torch.dtype) -> W8A8Linear:
        where = f"{name}: quantization_config"
        groups = read_mapping(quantization_config, "config_groups", where=where)
        if len(groups) != 1:
            raise CheckpointError(f"llmquant reads compressed-tensors with one config group, found {len(groups)}")
        group_name, group = next(iter(groups.items()))
        group = read_mapping(groups, group_name, where=f"{where}.config_groups")
        where = f"{where}.config_groups.{group_name}"
        weights = read_mapping(group, "weights", where=where)
        inputs = read_mapping(group, "input_activations", where=where)
        fmt = read_str(quantization_config, "format", where=f"{name}: quantization_config")
        for scheme, what in ((weights, "weights"), (inputs, "input_activations")):
            read_int(scheme, "num_bits", allowed=(8,), where=f"{where}.{what}")
            read_str(scheme, "type", where=f"{where}.{what}")
            read_str(scheme, "strategy", where=f"{where}.{what}")
        if fmt != "int-quantized" or weights["type"] != "int" or weights["strategy"] != "channel" \
                or not weights.get("symmetric"):
            raise CheckpointError(f"llmquant reads compressed-tensors int8 per-channel symmetric weights "
                                  f"(format int-quantized); this checkpoint has format {fmt!r}, weights {weights}")
        if inputs["type"] != "int" or not inputs.get("symmetric") \
                or (inputs["strategy"], bool(inputs.get("dynamic"))) not in (("token", True), ("tensor", False)):
            raise CheckpointError(f"unsupported input_activations scheme {inputs}: llmquant reads int8 symmetric, "
                                  "dynamic per token or static per tensor")
        static = inputs.get("strategy") == "tensor"
        expected = {"weight": (out_features, in_features), "weight_scale": (out_features, 1)}
        if static:
            expected["input_scale"] = (1,)
        for suffix, shape in expected.items():
            if suffix not in shapes:
                raise CheckpointError(f"{name}: missing tensor {name}.{suffix}")
            if tuple(shapes[suffix]) != shape:
                raise CheckpointError(f"{name}.{suffix} has shape {tuple(shapes[suffix])}, expected {shape}")
        if not static and "input_scale" in shapes:
            raise CheckpointError(f"{name}.input_scale present, but the config says dynamic activations")
        return W8A8Linear(in_features, out_features, static=static, bias=has_bias, dtype=dtype)
