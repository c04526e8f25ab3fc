"""Quantized-linear modules that replace nn.Linear in a loaded checkpoint."""
from .gptq_linear import GPTQLinear

__all__ = ["GPTQLinear"]
