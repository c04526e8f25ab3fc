"""The GPTQ checkpoint format (checkpoint_format "gptq", i.e. v1), as transformers / vLLM read it.

Per quantized linear `<name>` (weight [out, in], G = ceil(in / group_size) groups):
- `<name>.qweight` int32 [in * bits / 32, out]: codes packed along the input dim, low bits first;
- `<name>.qzeros`  int32 [G, out * bits / 32]: zero points minus one, packed along the output dim;
- `<name>.scales`  fp16  [G, out];
- `<name>.g_idx`   int32 [in]: group of each input column;
- `<name>.bias`    optional, in the storage dtype.
Dequantization: w[o, i] = (q[i, o] - (z[g_idx[i], o] + 1)) * s[g_idx[i], o].
The stored "zero - 1" cannot hold zero 0, so asymmetric grids are asked for zero >= 1.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from ..storage import bitpack
from .._version import __version__
from ..errors import CheckpointError, ConfigError
from ..grid import PER_CHANNEL
from ..inference.nn.gptq_linear import GPTQLinear
from .base import (FLOAT_DTYPES, CheckpointFormat, RoundedWeight, check_bias, check_dtype, check_finite,
                   check_group_index, check_range, read_group_size, read_int, read_str)

if TYPE_CHECKING:  # configs arrive as arguments; config.py imports this registry
    from ..config import QuantConfig

TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# Bit widths llmquant writes: those transformers / vLLM GPTQ kernels load. 5- to 7-bit checkpoints
# of earlier llmquant versions are still read (the packing is generic).
BITS = (2, 3, 4, 8)
READ_BITS = range(2, 9)
# checkpoint_format -> what is added to a stored zero point to get the real one.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


class GPTQFormat(CheckpointFormat):
    name = "gptq"
    bits = BITS
    tensor_suffixes = TENSOR_SUFFIXES
    marker_suffix = "qweight"
    holds_activation_quantization = False
    holds_codebook_weights = False

    @staticmethod
    def reads(quant_method: str) -> bool:
        return quant_method == "gptq"

    @staticmethod
    def check_config(config: QuantConfig) -> None:
        pass  # bits: QuantConfig checks them against `bits`

    @staticmethod
    def grid_min_zero(config: QuantConfig) -> int:
        return 0 if config.sym else 1

    @staticmethod
    def check_layer(name: str, out_features: int, in_features: int, config: QuantConfig) -> None:
        """Raise if the packed layout cannot hold a linear of this shape."""
        bits = config.bits
        values_per_run, _ = bitpack.run_shape(bits)
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % values_per_run:
                raise ConfigError(
                    f"{name}: {what}={size} is not a multiple of {values_per_run}, which the gptq "
                    f"format needs to pack {bits}-bit values into int32 words; keep this layer in "
                    "floating point (modules_to_not_convert) or choose another bit width"
                )

    @staticmethod
    def pack(quantized: RoundedWeight, config: QuantConfig) -> dict[str, torch.Tensor]:
        stored_zero = quantized.zero - ZERO_OFFSETS["gptq"]
        if (stored_zero < 0).any():
            raise ValueError("gptq v1 cannot store a zero point of 0 (it stores zero - 1); use min_zero=1")
        return {
            "qweight": bitpack.pack(quantized.codes.t().to(torch.int32), quantized.bits, dim=0),
            "qzeros": bitpack.pack(stored_zero.t().to(torch.int32), quantized.bits, dim=1),
            "scales": quantized.scale.t().to(torch.float16).contiguous(),
            "g_idx": quantized.group_index.to(torch.int32).contiguous(),
        }

    @staticmethod
    def quantization_config(config: QuantConfig, extra: dict | None = None) -> dict:
        qc = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": config.bits,
            "group_size": config.group_size,
            "sym": config.sym,
            "desc_act": config.act_order,
            "static_groups": config.static_groups,
            "true_sequential": config.true_sequential,
            "damp_percent": config.damp,
            "lm_head": False,
            "meta": {"quantizer": [f"llmquant:{__version__}"], "method": config.method},
        }
        if config.modules_to_not_convert:
            qc["modules_to_not_convert"] = list(config.modules_to_not_convert)
        dynamic = {f"+:^{re.escape(name)}$": dict(override) for name, override in sorted(config.layer_overrides.items())
                   if config.for_layer(name).bits != config.bits or config.for_layer(name).group_size != config.group_size}
        if dynamic:
            qc["dynamic"] = dynamic
        qc.update(extra or {})
        return qc

    @classmethod
    def build_linear(cls, name: str, quantization_config: dict, shapes: dict[str, tuple], has_bias: bool,
                     in_features: int, out_features: int, dtype: torch.dtype) -> GPTQLinear:
        """An empty GPTQLinear for the tensors `shapes` (suffix -> shape) found in the checkpoint."""
        where = f"{name}: quantization_config"
        bits = read_int(quantization_config, "bits", allowed=READ_BITS, where=where)
        group_size = read_group_size(quantization_config, where=where)
        checkpoint_format = read_str(quantization_config, "checkpoint_format", default="gptq", where=where)
        if checkpoint_format not in ZERO_OFFSETS:
            raise CheckpointError(
                f"unsupported checkpoint_format {checkpoint_format!r}; llmquant reads {sorted(ZERO_OFFSETS)}"
            )
        missing = [s for s in TENSOR_SUFFIXES if s not in shapes]
        if missing:
            raise CheckpointError(f"{name}: missing tensors {', '.join(name + '.' + s for s in missing)}")
        groups = 1 if group_size == PER_CHANNEL else -(-in_features // group_size)
        expected = {
            "qweight": (in_features * bits // 32, out_features),
            "qzeros": (groups, out_features * bits // 32),
            "scales": (groups, out_features),
            "g_idx": (in_features,),
        }
        for suffix, shape in expected.items():
            if tuple(shapes[suffix]) != shape:
                raise CheckpointError(
                    f"{name}.{suffix} has shape {tuple(shapes[suffix])}, but a {bits}-bit linear "
                    f"{in_features}->{out_features} with group_size {group_size} needs {shape} "
                    "(the quantization_config disagrees with the tensors)"
                )
        return GPTQLinear(
            in_features, out_features, bits=bits, group_size=group_size, num_groups=groups,
            zero_offset=ZERO_OFFSETS[checkpoint_format], bias=has_bias, dtype=dtype,
        )

    @staticmethod
    def check_tensors(name: str, module: GPTQLinear, tensors: dict[str, torch.Tensor]) -> None:
        for suffix in ("qweight", "qzeros", "g_idx"):
            check_dtype(f"{name}.{suffix}", tensors[suffix], torch.int32)
        check_dtype(f"{name}.scales", tensors["scales"], *FLOAT_DTYPES)
        check_finite(f"{name}.scales", tensors["scales"])
        groups = tensors["scales"].shape[0]
        width = module.in_features if module.group_size == PER_CHANNEL else module.group_size
        check_group_index(f"{name}.g_idx", tensors["g_idx"], groups, width)
        if module.zero_offset:
            # v1 stores zero - 1: an all-ones field would read as 2^bits, off the grid. It is what a
            # writer that wrapped zero 0 to -1 leaves (AutoGPTQ's asymmetric underflow).
            zeros = bitpack.unpack(tensors["qzeros"], module.bits, dim=1)
            check_range(f"{name}.qzeros", zeros, 0, 2 ** module.bits - 1 - module.zero_offset,
                        f"a stored GPTQ v1 zero point (zero - 1) of {module.bits} bits")
        check_bias(name, tensors, module.out_features)


def dynamic_override(quantization_config: dict, module_name: str) -> dict | None:
    """The quantization_config one module is stored with under GPTQModel's `dynamic` rules (as vLLM
    reads them): patterns tried in order with re.match; "-:PATTERN" leaves matching modules
    unquantized (None), "+:PATTERN" or a bare pattern overrides keys such as bits / group_size."""
    dynamic = quantization_config.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise CheckpointError(f"quantization_config.dynamic must be a mapping of patterns, got {type(dynamic).__name__}")
    for pattern, override in dynamic.items():
        try:
            if pattern.startswith("-:"):
                if re.match(pattern[2:], module_name):
                    return None
            elif re.match(pattern.removeprefix("+:"), module_name):
                if not isinstance(override, dict):
                    raise CheckpointError(f"quantization_config.dynamic[{pattern!r}] must be a mapping")
                return {**quantization_config, **override}
        except re.error as exc:
            raise CheckpointError(f"quantization_config.dynamic has an invalid pattern {pattern!r}: {exc}") from exc
    return quantization_config
