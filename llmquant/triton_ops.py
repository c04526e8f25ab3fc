"""The Triton implementations of llmquant's ops (see ops.py), calling llmquant_kernels, with the same
arguments as the ops' reference implementations. They have no backward: ops.py sends calls that
need a gradient to the reference."""
from __future__ import annotations


def gptq_linear(x, qweight, qzeros, scales, g_idx, bias, bits, zero_offset):
    from llmquant_kernels import w4a16_matmul

    return w4a16_matmul(x, qweight, qzeros, scales, g_idx, bias, bits=bits, layout="gptq", zero_offset=zero_offset)


def awq_linear(x, qweight, qzeros, scales, bias, group_size):
    from llmquant_kernels import w4a16_matmul

    return w4a16_matmul(x, qweight, qzeros, scales, None, bias, bits=4, layout="awq", zero_offset=0,
                        group_size=group_size)


def w8a8_linear(x, weight, weight_scale, input_scale, bias):
    from llmquant_kernels import int8_scaled_matmul, quantize_rows_int8

    rows = x.reshape(-1, x.shape[-1])
    codes, x_scale = quantize_rows_int8(rows, input_scale)
    out = int8_scaled_matmul(codes, x_scale, weight, weight_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def codebook4_linear(x, packed, absmax, table, nested_absmax, nested_table, nested_offset, nested_blocksize,
                     blocksize, shape, bias):
    from llmquant_kernels import codebook4_matmul

    nested = (nested_absmax, nested_table, nested_offset, nested_blocksize) if nested_absmax is not None else None
    return codebook4_matmul(x, packed, absmax, table, blocksize, tuple(shape), bias, nested)
