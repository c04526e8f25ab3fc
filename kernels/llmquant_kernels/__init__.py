"""llmquant's Triton kernels. They take plain tensors and a layout description and import nothing of
llmquant. Installed as `llmquant_kernels` (never as a top-level `kernels`, the name of the Hugging
Face package that transformers and bitsandbytes probe for). On a CPU they run only under the
Triton interpreter: set TRITON_INTERPRET=1 before importing this package."""
from . import codebook4, fp8, hadamard, w4a16, w8a8
from .codebook4 import codebook4_matmul
from .fp8 import fp8_block_matmul
from .hadamard import hadamard_transform
from .w4a16 import w4a16_matmul
from .w8a8 import int8_scaled_matmul, quantize_rows_int8

# Every kernel's launch declaration (_launch.KernelSpec): what aot.py compiles and records
SPECS = (*w4a16.SPECS, *w8a8.SPECS, *codebook4.SPECS, *fp8.SPECS, *hadamard.SPECS)

__all__ = ["SPECS", "codebook4_matmul", "fp8_block_matmul", "hadamard_transform", "int8_scaled_matmul", "quantize_rows_int8", "w4a16_matmul"]
