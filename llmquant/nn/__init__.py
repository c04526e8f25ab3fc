"""Quantized-linear modules that replace nn.Linear in a loaded checkpoint."""
from .awq_linear import AWQLinear
from .gptq_linear import GPTQLinear
from .w8a8_linear import W8A8Linear

__all__ = ["AWQLinear", "GPTQLinear", "W8A8Linear"]
