"""Checkpoint formats: how a rounded weight becomes named tensors and a quantization_config.

Each format is one file implementing base.CheckpointFormat (the one typed protocol: name, bits,
reads, check_config, check_layer, grid_min_zero, pack(quantized, config), quantization_config,
build_linear, ...); this registry maps a format name (for writing) and a `quant_method` (for
reading) to it.
"""
from .awq import AWQFormat
from .base import CheckpointFormat
from .bitsandbytes import BitsAndBytesFormat
from .compressed_tensors import CompressedTensorsFormat
from .compressed_tensors_fp8 import CompressedTensorsFp8Format
from .gptq import GPTQFormat

FORMATS: dict[str, CheckpointFormat] = {
    fmt.name: fmt() for fmt in (GPTQFormat, AWQFormat, CompressedTensorsFormat, BitsAndBytesFormat,
                                CompressedTensorsFp8Format)}


def format_for_quantization_config(quantization_config: dict) -> CheckpointFormat | None:
    """The format that reads a checkpoint with this `quantization_config`, or None."""
    for fmt in FORMATS.values():
        if fmt.reads_config(quantization_config):
            return fmt
    method = str(quantization_config.get("quant_method", "")).lower()
    for fmt in FORMATS.values():
        if fmt.reads(method):
            return fmt
    return None


__all__ = ["FORMATS", "CheckpointFormat", "format_for_quantization_config"]
