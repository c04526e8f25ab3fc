"""The Triton implementations of llmquant's ops (backend "triton"), calling llmquant_kernels, with the
same arguments as the ops' reference implementations. They have no backward: registry.call sends
calls that need a gradient to the reference.

On a GPU the kernels take float16 or bfloat16 activations, the dtypes they are compiled for and
proven to compile (llmquant_kernels.aot); float32 activations there (--compute-dtype float32) run
the torch reference. Under the interpreter (a CPU) they take float32 too, as the tests use them."""
from __future__ import annotations

import functools

import torch

from .registry import OPS, TRITON, implements

GPU_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


def triton_kernel(name: str):
    """Register the decorated function as op `name`'s Triton implementation; float32 activations on a
    GPU run the reference instead."""
    def decorate(kernel):
        @functools.wraps(kernel)
        def run(x, *args):
            if x.is_cuda and x.dtype not in GPU_ACTIVATION_DTYPES:
                return OPS[name].reference(x, *args)
            return kernel(x, *args)

        return implements(name, TRITON)(run)

    return decorate


@triton_kernel("gptq_linear")
def gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset):
    from llmquant_kernels import w4a16_matmul

    return w4a16_matmul(x, qweight, qzeros, scales, g_idx, bias, bits=bits, layout="gptq", zero_offset=zero_offset)


@triton_kernel("awq_linear")
def awq_linear(x, qweight, qzeros, scales, bias, group_size):
    from llmquant_kernels import w4a16_matmul

    return w4a16_matmul(x, qweight, qzeros, scales, None, bias, bits=4, layout="awq", zero_offset=0,
                        group_size=group_size)


@triton_kernel("w8a8_linear")
def w8a8_linear(x, weight, weight_scale, input_scale, bias):
    from llmquant_kernels import int8_scaled_matmul, quantize_rows_int8

    rows = x.reshape(-1, x.shape[-1])
    codes, x_scale = quantize_rows_int8(rows, input_scale)
    out = int8_scaled_matmul(codes, x_scale, weight, weight_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@triton_kernel("codebook4_linear")
def codebook4_linear(x, packed, absmax, table, nested_absmax, nested_table, nested_offset, nested_blocksize,
                     blocksize, shape, bias):
    from llmquant_kernels import codebook4_matmul

    nested = (nested_absmax, nested_table, nested_offset, nested_blocksize) if nested_absmax is not None else None
    return codebook4_matmul(x, packed, absmax, table, blocksize, tuple(shape), bias, nested)


@implements("fp8_linear", TRITON)
def fp8_linear(x, weight, weight_scale, bias):
    """W8A8-FP8 on the device: x rounded to e4m3 per token (torch), then torch._scaled_mm with row-wise
    scales (cuBLASLt's FP8 GEMM on compute capability 8.9+; torch also runs it on CPUs). Its output is
    bfloat16 on CUDA, the one high-precision type every torch version takes with row-wise scales."""
    from ...grid.fp8 import quantize_rows_fp8

    rows = x.reshape(-1, x.shape[-1])
    codes, x_scale = quantize_rows_fp8(rows)
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    out = torch._scaled_mm(codes, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().reshape(1, -1),
                           out_dtype=out_dtype).to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@triton_kernel("fp8_block_linear")
def fp8_block_linear(x, weight, weight_scale, bias, block):
    from llmquant_kernels import fp8_block_matmul

    return fp8_block_matmul(x, weight, weight_scale, block, bias)


@triton_kernel("hadamard_transform")
def hadamard_transform(x, small, scale):
    from llmquant_kernels import hadamard_transform as kernel

    return kernel(x, small, scale)
