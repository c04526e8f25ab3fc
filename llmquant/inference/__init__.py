"""What runs at load and inference time: a checkpoint loaded with its linears kept packed (loading), the
quantized-linear modules (nn), the matmul ops they call (ops: each declared once, with its implementations per device),
the CPU fast paths (cpu), and timed generation (generation).
"""
