"""The CPU fast paths (llmquant.cpu) at run time: W8A8's int8pack variant does not overflow under
float16 activations."""
import torch

from llmquant.cpu.w8a8 import W8A8Kernel
from llmquant.nn import W8A8Linear
from test_cpu_fast import reference_output, relative_error


def test_w8a8_int8pack_variant_does_not_overflow_under_float16_activations():
    in_features = 4096  # 16129 * 4096: far past float16's 65504
    module = W8A8Linear(in_features, 32, static=False, dtype=torch.float16)
    module.weight.fill_(127)
    module.weight[::2, ::3] = -128
    module.weight_scale.fill_(1e-4)
    x = (torch.rand(3, in_features) + 1).half()  # positive: every product adds up
    expected = reference_output(module, x)
    assert torch.isfinite(expected).all() and expected.abs().max() > 1
    got = W8A8Kernel([module], torch.float16, use_int_mm=False)(x)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert relative_error(got.float(), expected.float()) < 1e-3
    assert torch.equal(W8A8Kernel([module], torch.float16, use_int_mm=True)(x), expected)
