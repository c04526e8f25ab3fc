"""The AWQ GEMM checkpoint format (quant_method "awq", version "gemm"), as transformers / vLLM /
AutoAWQ read it. 4-bit only.

Per quantized linear `<name>` (weight [out, in], G = in / group_size groups):
- `<name>.qweight` int32 [in, out / 8]: codes packed along the OUTPUT dim, nibble k of word c
  holding column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[k];
- `<name>.qzeros`  int32 [G, out / 8]: zero points, same packing, no offset;
- `<name>.scales`  fp16  [G, out];
- `<name>.bias`    optional. There is no g_idx: groups are contiguous (no act-order).
Dequantization: w[o, i] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o].
Zero points are always stored: a symmetric grid stores 8 everywhere (zero_point false in the config).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..storage import bitpack
from ..inference import ops
from .._version import __version__
from ..errors import CheckpointError, ConfigError
from ..grid import PER_CHANNEL
from ..inference.nn.awq_linear import AWQLinear
from .base import (FLOAT_DTYPES, CheckpointFormat, RoundedWeight, check_bias, check_dtype, check_finite,
                   read_group_size, read_int, read_str)

if TYPE_CHECKING:  # configs arrive as arguments; config.py imports this registry
    from ..config import QuantConfig

TENSOR_SUFFIXES = ("qweight", "qzeros", "scales")
PACK = 8  # 4-bit values per int32


class AWQFormat(CheckpointFormat):
    name = "awq"
    bits = (4,)
    tensor_suffixes = TENSOR_SUFFIXES
    marker_suffix = "qweight"
    holds_activation_quantization = False
    holds_codebook_weights = False

    @staticmethod
    def reads(quant_method: str) -> bool:
        return quant_method == "awq"

    @staticmethod
    def check_config(config: QuantConfig) -> None:
        if config.act_order:
            raise ConfigError("the awq format has no g_idx, so it cannot store act-order; use --format gptq")

    @staticmethod
    def grid_min_zero(config: QuantConfig) -> int:
        return 0

    @staticmethod
    def check_layer(name: str, out_features: int, in_features: int, config: QuantConfig) -> None:
        if out_features % PACK:
            raise ConfigError(f"{name}: out_features={out_features} is not a multiple of {PACK}, which the awq "
                              "format needs; keep this layer in floating point or use --format gptq")
        if config.group_size != PER_CHANNEL and in_features % config.group_size:
            raise ConfigError(f"{name}: in_features={in_features} is not a multiple of group_size "
                              f"{config.group_size}, and the awq format has no partial groups; "
                              "choose a group size that divides it or use --format gptq")

    @staticmethod
    def pack(quantized: RoundedWeight, config: QuantConfig) -> dict[str, torch.Tensor]:
        out_features, in_features = quantized.codes.shape
        width = in_features if quantized.group_size == PER_CHANNEL else quantized.group_size
        if not torch.equal(quantized.group_index.long(), torch.arange(in_features, device=quantized.codes.device) // width):
            raise ValueError("the awq format needs contiguous groups (no act-order g_idx)")
        interleave = ops.awq_interleave(out_features, quantized.codes.device)
        return {
            "qweight": bitpack.pack(quantized.codes.t().to(torch.int32)[:, interleave], 4, dim=1),
            "qzeros": bitpack.pack(quantized.zero.t().to(torch.int32)[:, interleave], 4, dim=1),
            "scales": quantized.scale.t().to(torch.float16).contiguous(),
        }

    @staticmethod
    def quantization_config(config: QuantConfig, extra: dict | None = None) -> dict:
        qc = {
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "group_size": config.group_size,
            "zero_point": not config.sym,
            "modules_to_not_convert": list(config.modules_to_not_convert) or None,
            "meta": {"quantizer": [f"llmquant:{__version__}"], "method": config.method},
        }
        qc.update(extra or {})
        return qc

    @classmethod
    def build_linear(cls, name: str, quantization_config: dict, shapes: dict[str, tuple], has_bias: bool,
                     in_features: int, out_features: int, dtype: torch.dtype) -> AWQLinear:
        where = f"{name}: quantization_config"
        read_int(quantization_config, "bits", "w_bit", allowed=(4,), where=where)
        group_size = read_group_size(quantization_config, "group_size", "q_group_size", where=where)
        version = read_str(quantization_config, "version", default="gemm", where=where).lower()
        if version != "gemm":
            raise CheckpointError(f"awq version {version!r} is not read by llmquant (only 'gemm')")
        width = in_features if group_size == PER_CHANNEL else group_size
        if in_features % width or out_features % PACK:
            raise CheckpointError(f"{name}: a {in_features}->{out_features} linear does not fit the awq layout "
                                  f"with group_size {group_size}")
        missing = [s for s in TENSOR_SUFFIXES if s not in shapes]
        if missing:
            raise CheckpointError(f"{name}: missing tensors {', '.join(name + '.' + s for s in missing)}")
        groups = in_features // width
        expected = {
            "qweight": (in_features, out_features // PACK),
            "qzeros": (groups, out_features // PACK),
            "scales": (groups, out_features),
        }
        for suffix, shape in expected.items():
            if tuple(shapes[suffix]) != shape:
                raise CheckpointError(
                    f"{name}.{suffix} has shape {tuple(shapes[suffix])}, but a 4-bit awq linear "
                    f"{in_features}->{out_features} with group_size {group_size} needs {shape} "
                    "(the quantization_config disagrees with the tensors)"
                )
        return AWQLinear(in_features, out_features, group_size=width, bias=has_bias, dtype=dtype)

    @staticmethod
    def check_tensors(name: str, module: AWQLinear, tensors: dict[str, torch.Tensor]) -> None:
        # every nibble is a valid 4-bit code or zero point, so int32 words need no value check
        for suffix in ("qweight", "qzeros"):
            check_dtype(f"{name}.{suffix}", tensors[suffix], torch.int32)
        check_dtype(f"{name}.scales", tensors["scales"], *FLOAT_DTYPES)
        check_finite(f"{name}.scales", tensors["scales"])
        check_bias(name, tensors, module.out_features)
