"""Checkpoint formats: how a QuantizedWeight becomes named tensors and a quantization_config.

Each format is one file (name, reads, check_config, check_layer, grid_min_zero, pack,
quantization_config, build_linear, tensor_suffixes); this registry maps a format name (for writing) and a
`quant_method` (for reading) to it.
"""
from .awq import AWQFormat
from .gptq import GPTQFormat

FORMATS = {GPTQFormat.name: GPTQFormat(), AWQFormat.name: AWQFormat()}


def format_for_quantization_config(quantization_config: dict):
    """The format that reads a checkpoint with this `quantization_config`, or None."""
    method = str(quantization_config.get("quant_method", "")).lower()
    for fmt in FORMATS.values():
        if fmt.reads(method):
            return fmt
    return None


__all__ = ["FORMATS", "format_for_quantization_config"]
