"""What every checkpoint format implements: one typed protocol, so that the pipeline, the loader
and the registry hold any format through the same interface."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Union, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..config import QuantConfig
    from ..grid import QuantizedWeight
    from ..grid.codebook import CodebookWeight

# The format-neutral result of rounding one weight: on an affine grid, or on a 4-bit codebook.
RoundedWeight = Union["QuantizedWeight", "CodebookWeight"]


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

    def reads(self, quant_method: str) -> bool:
        """Whether this format reads checkpoints whose quantization_config has this quant_method."""
        ...

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
