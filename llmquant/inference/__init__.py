"""What runs at load and inference time: a checkpoint loaded with its linears kept packed (loading), the
quantized-linear modules (nn), the matmul ops they call (ops, fp8_ops; triton_ops for the GPU kernels),
the CPU fast paths (cpu), and timed generation (generation).
"""
