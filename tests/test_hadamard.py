"""The fast Hadamard transform (ops.hadamard_transform: torch butterflies on the CPU, llmquant_kernels'
hadamard_rows under the interpreter) against the dense product x @ H / sqrt(n), at the orders of the
models' down_proj inputs: SmolLM2's 1536 = 12 x 128, Llama-3.2-1B's 8192, Llama-3-8B's 14336 = 224 x 64,
Qwen2-0.5B's 4864 = 152 x 32, and 64."""
import math

import pytest
import torch

from llmquant.inference import ops
from llmquant.rotation.hadamard import hadamard, hadamard_factors
from llmquant_kernels import hadamard_transform as kernel

pytestmark = pytest.mark.timeout(300)
ORDERS = (64, 1536, 4864, 8192, 14336)
# fp32: products of +-1 rounded once per add; fp16 / bf16: the result's own rounding (computed in fp32)
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _dense(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x.double() @ hadamard(n)) / math.sqrt(n)


@pytest.mark.parametrize("n", ORDERS)
def test_the_factors_build_the_hadamard_matrix_the_rotations_use(n):
    small, power = hadamard_factors(n)
    assert power & (power - 1) == 0 and (1 if small is None else small.shape[0]) * power == n
    expected_small = {64: 1, 1536: 12, 4864: 152, 8192: 1, 14336: 224}[n]
    assert (1 if small is None else small.shape[0]) == expected_small


def test_orders_without_a_built_hadamard_matrix_have_no_factors():
    assert hadamard_factors(6) is None and hadamard_factors(18944) is None  # Qwen2.5-7B's 18944 = 256 x 74


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", ORDERS)
def test_the_fast_transform_is_the_dense_product(n, dtype, backend):
    small, _ = hadamard_factors(n)
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    with ops.use_backend(backend):
        y = ops.hadamard_transform(x, small, 1 / math.sqrt(n))
    assert y.dtype == dtype and y.shape == x.shape
    expected = _dense(x, n)
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE[dtype], (n, dtype, backend, float(error))


def test_the_kernel_takes_strided_rows_and_is_its_own_inverse():
    n = 1536
    small, _ = hadamard_factors(n)
    wide = torch.randn(5, 2 * n)
    x = wide[:, :n]  # rows one stride apart, not contiguous
    y = kernel(x, small, 1 / math.sqrt(n))
    assert torch.allclose(y.double(), _dense(x, n), atol=1e-5)
    # H H^T = n I and H = A ⊗ H_P with A's transpose: applying A^T ⊗ H_P undoes it
    back = kernel(y, small.t().contiguous(), 1 / math.sqrt(n))
    assert torch.allclose(back, x, atol=1e-5)


def test_orders_the_transform_does_not_take_are_refused_by_name():
    small, _ = hadamard_factors(1536)
    with pytest.raises(ValueError, match="1000 is not a power of two times the small matrix's order 12"):
        ops.hadamard_transform(torch.randn(2, 1000), small, 1.0)
    with pytest.raises(ValueError, match="is not a power of two times"):
        kernel(torch.randn(2, 96), None, 1.0)


def test_small_factors_too_big_for_the_kernels_dot_follow_its_butterflies():
    """576 = 72 x 8 (SmolLM2's hidden size: a power-of-two part below tl.dot's 16) and 14336 = 224 x 64
    (A^T too big for shared memory): the kernel's fp32 butterflies, then one batched product."""
    from llmquant_kernels.hadamard import _tile

    assert not _tile(72, 8)["HAS_SMALL"] and not _tile(224, 64)["HAS_SMALL"] and _tile(12, 128)["HAS_SMALL"]
    small, power = hadamard_factors(576)
    assert power == 8
    x = torch.randn(3, 576, dtype=torch.float16)
    y = kernel(x, small, 1 / 24)
    assert y.dtype == torch.float16 and torch.allclose(y.double(), _dense(x, 576), atol=2e-3)
