"""What every checkpoint format implements: one typed protocol, so that the pipeline, the loader
and the registry hold any format through the same interface."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

    from ..config import QuantConfig
    from ..grid import QuantizedWeight
    from ..grid.codebook import CodebookWeight
    from ..grid.fp8 import Fp8Weight

# The format-neutral result of rounding one weight: on an affine grid, a 4-bit codebook, or FP8.
RoundedWeight = Union["QuantizedWeight", "CodebookWeight", "Fp8Weight"]


@runtime_checkable
class CheckpointFormat(Protocol):
    """A checkpoint format: how a rounded weight becomes named tensors and a quantization_config
    (writing), and how those become a quantized linear module again (reading).

    name: the --format name; bits: the bit widths it holds (those its ecosystem loaders read);
    tensor_suffixes: the tensors of one quantized linear; marker_suffix: the one that marks a
    linear as quantized; holds_activation_quantization: W8A8 layers rather than weight-only ones;
    holds_codebook_weights: NF4 / FP4 codebook weights rather than affine ones.
    """

    name: str
    bits: tuple[int, ...]
    tensor_suffixes: tuple[str, ...]
    marker_suffix: str
    holds_activation_quantization: bool
    holds_codebook_weights: bool
    holds_fp8_weights: bool = False

    def reads(self, quant_method: str) -> bool:
        """Whether this format reads checkpoints whose quantization_config has this quant_method."""
        ...

    def reads_config(self, quantization_config: dict) -> bool:
        """Whether this format claims a checkpoint by the content of its quantization_config, before
        any format claims it by quant_method (two formats share compressed-tensors' quant_method)."""
        return False

    def check_config(self, config: QuantConfig) -> None:
        """Raise ConfigError for settings this format cannot store."""
        ...

    def grid_min_zero(self, config: QuantConfig) -> int:
        """The smallest zero point the format can store for an asymmetric grid."""
        ...

    def check_layer(self, name: str, out_features: int, in_features: int, config: QuantConfig) -> None:
        """Raise ConfigError if a linear of this shape cannot be stored."""
        ...

    def pack(self, quantized: RoundedWeight, config: QuantConfig) -> dict[str, torch.Tensor]:
        """The tensors of one quantized linear (suffix -> tensor); `config`: that linear's settings."""
        ...

    def quantization_config(self, config: QuantConfig, extra: dict | None = None) -> dict:
        """config.json's quantization_config for a checkpoint written with `config`."""
        ...

    def build_linear(self, name: str, quantization_config: dict, shapes: dict[str, tuple], has_bias: bool,
                     in_features: int, out_features: int, dtype: torch.dtype) -> nn.Module:
        """An empty quantized linear for the tensors `shapes` (suffix -> shape) found in a checkpoint;
        raise CheckpointError when the config or the shapes are not what this format stores."""
        ...

    def check_tensors(self, name: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Raise CheckpointError naming the tensor when one of `tensors` (suffix -> tensor: the
        checkpoint's own for the linear `name`, bias included), read into `module` as build_linear
        built it, has a dtype the format does not store or values no op may be given (indices out of
        range, NaN / inf scales). Runs before the tensors reach the module, and so any kernel."""
        ...


# ---- reading a checkpoint's quantization_config: a CheckpointError naming the key, never a TypeError ----

REQUIRED = object()


def _lookup(config: dict, keys: tuple[str, ...], default, where: str):
    """(the first of `keys` that config holds, its value), or (keys[0], default)."""
    for key in keys:
        if config.get(key) is not None:
            return key, config[key]
    if default is REQUIRED:
        raise CheckpointError(f"{where} has no {keys[0]!r}")
    return keys[0], default


def read_int(config: dict, *keys: str, default=REQUIRED, allowed=None, where: str = "quantization_config") -> int:
    """config[key] (the first of `keys` present) as an integer: not a bool, a float such as 4.0 or a
    string; one of `allowed` when given."""
    key, value = _lookup(config, keys, default, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}.{key} must be an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise CheckpointError(f"{where}.{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def read_group_size(config: dict, *keys: str, default=REQUIRED, where: str = "quantization_config") -> int:
    """A group size (the first of `keys` present, default "group_size"): a positive integer, or -1
    for one group per output channel."""
    keys = keys or ("group_size",)
    size = read_int(config, *keys, default=default, where=where)
    if size < 1 and size != -1:
        raise CheckpointError(f"{where}.{keys[0]} must be > 0 or -1 (per output channel), got {size!r}")
    return size


def read_str(config: dict, key: str, default=REQUIRED, where: str = "quantization_config") -> str:
    _, value = _lookup(config, (key,), default, where)
    if not isinstance(value, str):
        raise CheckpointError(f"{where}.{key} must be a string, got {value!r}")
    return value


def read_mapping(config: dict, key: str, default=REQUIRED, where: str = "quantization_config") -> dict:
    _, value = _lookup(config, (key,), default, where)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}.{key} must be a mapping, got {value!r}")
    return value


# ---- the values a checkpoint brings: each format's check_tensors is made of these ----

# Scales and biases: every op reads them in fp32 (or the activations' dtype), so any of these is
# read exactly. GPTQ / AWQ writers store fp16 scales; llm-compressor stores the model's dtype (bf16
# on the hub, fp32 from an fp32 model), for int8, FP8 and pack-quantized alike.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_dtype(where: str, tensor: torch.Tensor, *dtypes: torch.dtype) -> None:
    if tensor.dtype not in dtypes:
        raise CheckpointError(f"{where} is {_dtype_name(tensor.dtype)}; the format stores it as "
                              f"{' or '.join(map(_dtype_name, dtypes))}")


def check_finite(where: str, tensor: torch.Tensor, positive: bool = False) -> None:
    """No NaN or inf, and, with `positive` (a scale that divides), nothing <= 0. Zero and negative
    multipliers are let through: bitsandbytes stores absmax 0 for an all-zero block, and an fp16
    scale of a tiny group underflows to 0; neither makes an op misbehave."""
    bad = ~torch.isfinite(tensor)
    if positive:
        bad |= tensor <= 0
    if not bool(bad.any()):
        return
    index = _first(bad)
    raise CheckpointError(f"{where} holds {tensor[index].item()} at {list(index)} ({int(bad.sum())} such values); "
                          f"it must be finite{' and > 0 (activations are divided by it)' if positive else ''}")


def check_range(where: str, tensor: torch.Tensor, low: int, high: int, what: str) -> None:
    """Integer values in [low, high], which `what` says the meaning of."""
    if tensor.numel() == 0:
        return
    smallest, largest = torch.aminmax(tensor)
    if int(smallest) >= low and int(largest) <= high:
        return
    index = _first((tensor < low) | (tensor > high))
    raise CheckpointError(f"{where} holds {tensor[index].item()} at {list(index)}; {what} must lie in {low}..{high}")


def check_group_index(where: str, g_idx: torch.Tensor, groups: int, group_size: int) -> None:
    """A g_idx (the group of each input column, act-order's permuted one included) that indexes the
    `groups` scale rows, no group holding more than group_size columns: GPTQ and llm-compressor
    derive it as (position in the quantization order) // group_size, so a fuller group means the
    group count or size disagrees with the tensors."""
    check_range(where, g_idx, 0, groups - 1, f"a group index ({groups} groups)")
    counts = torch.bincount(g_idx.reshape(-1).long(), minlength=groups)
    fullest = int(counts.argmax())
    if int(counts[fullest]) > group_size:
        raise CheckpointError(f"{where} puts {int(counts[fullest])} input columns in group {fullest}, more than "
                              f"group_size {group_size}: the group count disagrees with the tensors")


def check_bias(name: str, tensors: dict[str, torch.Tensor], out_features: int) -> None:
    bias = tensors.get("bias")
    if bias is None:
        return
    check_dtype(f"{name}.bias", bias, *FLOAT_DTYPES)
    if tuple(bias.shape) != (out_features,):
        raise CheckpointError(f"{name}.bias has shape {tuple(bias.shape)}, expected ({out_features},)")
    check_finite(f"{name}.bias", bias)
