"""Checkpoint formats: how a QuantizedWeight becomes named tensors and a quantization_config.

Each format is one file (name, reads, check_config, check_layer, grid_min_zero, pack(quantized, config),
quantization_config, build_linear, tensor_suffixes, marker_suffix: the tensor that marks a
quantized linear, holds_activation_quantization: whether it stores W8A8 layers or weight-only ones,
holds_codebook_weights: whether it stores NF4 / FP4 codebook weights); this registry maps a format name (for writing) and a
`quant_method` (for reading) to it.
"""
from .awq import AWQFormat
from .bitsandbytes import BitsAndBytesFormat
from .compressed_tensors import CompressedTensorsFormat
from .compressed_tensors_fp8 import CompressedTensorsFp8Format
from .gptq import GPTQFormat

FORMATS = {fmt.name: fmt() for fmt in (GPTQFormat, AWQFormat, CompressedTensorsFormat, BitsAndBytesFormat,
                                        CompressedTensorsFp8Format)}


def format_for_quantization_config(quantization_config: dict):
    """The format that reads a checkpoint with this `quantization_config`, or None."""
    # formats that share a quant_method with another say by its content (compressed-tensors FP8)
    for fmt in FORMATS.values():
        if getattr(fmt, "reads_config", None) is not None and fmt.reads_config(quantization_config):
            return fmt
    method = str(quantization_config.get("quant_method", "")).lower()
    for fmt in FORMATS.values():
        if fmt.reads(method):
            return fmt
    return None


__all__ = ["FORMATS", "format_for_quantization_config"]
