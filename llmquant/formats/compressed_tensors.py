"""The compressed-tensors formats, as llm-compressor writes them and vLLM serves them: llmquant writes
the int8 W8A8 one ("int-quantized") and also reads llm-compressor's weight-only "pack-quantized".

int-quantized, per quantized linear `<name>`:
- `<name>.weight`       int8 [out, in]: symmetric codes, w = weight * weight_scale;
- `<name>.weight_scale` fp32 [out, 1]: one scale per output channel;
- `<name>.input_scale`  fp32 [1]: static activation scale (only with static activations);
- `<name>.bias`         optional.
config: quant_method "compressed-tensors", format "int-quantized", one config group targeting
Linear with weights {int, 8 bits, symmetric, strategy channel} and input_activations
{int, 8 bits, symmetric, strategy token, dynamic true} or {strategy tensor, dynamic false}.

pack-quantized (read only; weight-only, 2..8 bits, no input_activations), per linear:
- `<name>.weight_packed`     int32 [out, in * bits / 32]: signed codes + 2^(bits-1), one little-endian
                             bit stream per row (low bits first);
- `<name>.weight_scale`      [out, G] in the model's dtype, G = ceil(in / group_size) (1 for strategy channel);
- `<name>.weight_zero_point` int32 [out * bits / 32, G]: signed zero points + 2^(bits-1) packed along
                             the output dim (asymmetric only);
- `<name>.weight_g_idx`      int32 [in]: group of each input column (activation order "group" only);
- `<name>.weight_shape`      int64 [2]: (out, in).
Dequantization: w = (q - z) * s with q, z the signed codes (z = 0 when symmetric).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..storage import bitpack
from .._version import __version__
from ..errors import CheckpointError
from ..grid import PER_CHANNEL
from ..inference.nn.pack_quantized_linear import PackQuantizedLinear
from ..inference.nn.w8a8_linear import W8A8Linear
from .base import (FLOAT_DTYPES, CheckpointFormat, RoundedWeight, check_bias, check_dtype, check_finite,
                   check_group_index, read_int, read_mapping, read_str)

if TYPE_CHECKING:  # configs arrive as arguments; config.py imports this registry
    from ..config import QuantConfig

TENSOR_SUFFIXES = ("weight", "weight_scale", "input_scale", "weight_packed", "weight_zero_point", "weight_g_idx",
                   "weight_shape")
PACKED_STRATEGIES = ("group", "channel")
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
                     in_features: int, out_features: int, dtype: torch.dtype) -> W8A8Linear | PackQuantizedLinear:
        where = f"{name}: quantization_config"
        groups = read_mapping(quantization_config, "config_groups", where=where)
        if len(groups) != 1:
            raise CheckpointError(f"llmquant reads compressed-tensors with one config group, found {len(groups)}")
        group_name = next(iter(groups))
        group = read_mapping(groups, group_name, where=f"{where}.config_groups")
        fmt = group.get("format") or read_str(quantization_config, "format", where=where)
        where = f"{where}.config_groups.{group_name}"
        if fmt == "pack-quantized":
            return _pack_quantized_linear(name, group, shapes, has_bias, in_features, out_features, dtype)
        weights = read_mapping(group, "weights", where=where)
        inputs = read_mapping(group, "input_activations", where=where)
        for scheme, what in ((weights, "weights"), (inputs, "input_activations")):
            read_int(scheme, "num_bits", allowed=(8,), where=f"{where}.{what}")
            read_str(scheme, "type", where=f"{where}.{what}")
            read_str(scheme, "strategy", where=f"{where}.{what}")
        if fmt != "int-quantized" or weights["type"] != "int" or weights["strategy"] != "channel" \
                or not weights.get("symmetric"):
            raise CheckpointError(f"llmquant reads compressed-tensors int8 per-channel symmetric weights "
                                  f"(format int-quantized) or weight-only pack-quantized ones; this checkpoint has "
                                  f"format {fmt!r}, weights {weights}")
        if inputs["type"] != "int" or not inputs.get("symmetric") \
                or (inputs["strategy"], bool(inputs.get("dynamic"))) not in (("token", True), ("tensor", False)):
            raise CheckpointError(f"unsupported input_activations scheme {inputs}: llmquant reads int8 symmetric, "
                                  "dynamic per token or static per tensor")
        static = inputs.get("strategy") == "tensor"
        expected = {"weight": (out_features, in_features), "weight_scale": (out_features, 1)}
        if static:
            expected["input_scale"] = (1,)
        _check_shapes(name, shapes, expected)
        if not static and "input_scale" in shapes:
            raise CheckpointError(f"{name}.input_scale present, but the config says dynamic activations")
        return W8A8Linear(in_features, out_features, static=static, bias=has_bias, dtype=dtype)

    @staticmethod
    def check_tensors(name: str, module: W8A8Linear | PackQuantizedLinear, tensors: dict[str, torch.Tensor]) -> None:
        if isinstance(module, PackQuantizedLinear):
            _check_pack_quantized(name, module, tensors)
        else:
            check_dtype(f"{name}.weight", tensors["weight"], torch.int8)  # every int8 is a code
            if "input_scale" in tensors:
                check_dtype(f"{name}.input_scale", tensors["input_scale"], *FLOAT_DTYPES)
                check_finite(f"{name}.input_scale", tensors["input_scale"], positive=True)
        check_dtype(f"{name}.weight_scale", tensors["weight_scale"], *FLOAT_DTYPES)
        check_finite(f"{name}.weight_scale", tensors["weight_scale"])
        check_bias(name, tensors, module.out_features)


def _check_shapes(name: str, shapes: dict[str, tuple], expected: dict[str, tuple]) -> None:
    for suffix, shape in expected.items():
        if suffix not in shapes:
            raise CheckpointError(f"{name}: missing tensor {name}.{suffix}")
        if tuple(shapes[suffix]) != shape:
            raise CheckpointError(f"{name}.{suffix} has shape {tuple(shapes[suffix])}, expected {shape}")


def _pack_quantized_linear(name: str, group: dict, shapes: dict[str, tuple], has_bias: bool, in_features: int,
                           out_features: int, dtype: torch.dtype) -> PackQuantizedLinear:
    where = f"{name}: config_groups.weights"
    weights = read_mapping(group, "weights", where=f"{name}: config_groups")
    bits = read_int(weights, "num_bits", allowed=tuple(range(2, 9)), where=where)
    strategy = read_str(weights, "strategy", where=where)
    if group.get("input_activations"):
        raise CheckpointError(f"pack-quantized with quantized input activations ({group['input_activations']}) "
                              "is not read by llmquant; it reads weight-only pack-quantized checkpoints")
    if weights.get("type") != "int" or strategy not in PACKED_STRATEGIES:
        raise CheckpointError(f"llmquant reads pack-quantized int weights of 2..8 bits with strategy "
                              f"{' or '.join(PACKED_STRATEGIES)}; this checkpoint has {weights}")
    if weights.get("actorder") not in (None, "group", "weight", "static", "dynamic"):
        raise CheckpointError(f"unknown actorder {weights.get('actorder')!r} in {weights}")
    values_per_run, _ = bitpack.run_shape(bits)
    if in_features % values_per_run or out_features % values_per_run:
        raise CheckpointError(f"{name}: a {in_features}->{out_features} linear does not fill whole int32 words "
                              f"at {bits} bits, which llmquant's packing needs")
    group_size = in_features if strategy == "channel" else read_int(weights, "group_size", where=where)
    if group_size < 1:
        raise CheckpointError(f"{name}: pack-quantized strategy group needs a positive group_size, got {group_size!r}")
    groups = -(-in_features // group_size)
    symmetric = bool(weights.get("symmetric", True))
    expected = {"weight_packed": (out_features, in_features * bits // 32), "weight_scale": (out_features, groups),
                "weight_shape": (2,)}
    if not symmetric:
        expected["weight_zero_point"] = (out_features * bits // 32, groups)
    if "weight_g_idx" in shapes:
        expected["weight_g_idx"] = (in_features,)
    _check_shapes(name, shapes, expected)
    return PackQuantizedLinear(in_features, out_features, bits, group_size, symmetric, g_idx="weight_g_idx" in shapes,
                               scale_dtype=dtype, bias=has_bias, dtype=dtype)


def _check_pack_quantized(name: str, module: PackQuantizedLinear, tensors: dict[str, torch.Tensor]) -> None:
    # packed codes and zero points: every bits-wide field is a valid (offset) signed value
    for suffix in ("weight_packed", "weight_zero_point", "weight_g_idx"):
        if suffix in tensors:
            check_dtype(f"{name}.{suffix}", tensors[suffix], torch.int32)
    shape = tensors["weight_shape"]
    check_dtype(f"{name}.weight_shape", shape, torch.int64)  # compressed-tensors: torch.tensor(weight.shape)
    if shape.tolist() != [module.out_features, module.in_features]:
        raise CheckpointError(f"{name}.weight_shape holds {shape.tolist()}, but the linear is "
                              f"[{module.out_features}, {module.in_features}]")
    if "weight_g_idx" in tensors:
        check_group_index(f"{name}.weight_g_idx", tensors["weight_g_idx"], tensors["weight_scale"].shape[1],
                          module.group_size)
