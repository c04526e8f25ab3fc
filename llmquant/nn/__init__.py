"""Quantized-linear modules that replace nn.Linear in a loaded checkpoint."""
from .awq_linear import AWQLinear
from .gptq_linear import GPTQLinear

__all__ = ["AWQLinear", "GPTQLinear"]
