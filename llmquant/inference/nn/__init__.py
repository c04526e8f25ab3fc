"""Quantized-linear modules that replace nn.Linear in a loaded checkpoint."""
from .awq_linear import AWQLinear
from .base import QuantizedLinear
from .bnb4bit_linear import BnB4bitLinear
from .fp8_linear import Fp8Linear
from .gptq_linear import GPTQLinear
from .pack_quantized_linear import PackQuantizedLinear
from .w8a8_linear import W8A8Linear

QUANTIZED_LINEARS = (GPTQLinear, AWQLinear, W8A8Linear, BnB4bitLinear, Fp8Linear, PackQuantizedLinear)

__all__ = ["AWQLinear", "BnB4bitLinear", "Fp8Linear", "GPTQLinear", "PackQuantizedLinear", "QUANTIZED_LINEARS",
           "QuantizedLinear", "W8A8Linear"]
