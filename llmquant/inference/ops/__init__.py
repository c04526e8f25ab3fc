"""The matmuls of the quantized linears (and the online Hadamard transform), each declared once: its
inputs and numerics by a reference implementation, its other implementations registered per device
(registry.py says how, and which one a call runs).

One file per op: gptq.py (GPTQ and pack-quantized), awq.py, w8a8.py, codebook4.py (NF4 / FP4),
fp8.py (W8A8-FP8 and FP8 block weights), hadamard.py. triton.py registers the llmquant_kernels
implementations; llmquant.inference.cpu registers the CPU's prepared weights.
"""
from .awq import AWQ_PACK_ORDER, awq_interleave, awq_linear, dequantize_awq, unpack_awq
from .codebook4 import codebook4_arguments, codebook4_linear, dequantize_4bit
from .fp8 import fp8_block_linear, fp8_linear
from .gptq import dequantize_gptq, gptq_linear
from .hadamard import HADAMARD_RADIX, hadamard_transform
from .registry import (BACKENDS, OPS, REFERENCE, TRITON, backend_for, call, call_layer, declare, implementation,
                       implements, register_prepared, requested_backend, use_backend)
from .w8a8 import int8_matmul, w8a8_linear

__all__ = ["AWQ_PACK_ORDER", "BACKENDS", "HADAMARD_RADIX", "OPS", "REFERENCE", "TRITON", "awq_interleave",
           "awq_linear", "backend_for", "call", "call_layer", "codebook4_arguments", "codebook4_linear", "declare",
           "dequantize_4bit", "dequantize_awq", "dequantize_gptq", "fp8_block_linear", "fp8_linear", "gptq_linear",
           "hadamard_transform", "implementation", "implements", "int8_matmul", "register_prepared",
           "requested_backend", "unpack_awq", "use_backend", "w8a8_linear"]
