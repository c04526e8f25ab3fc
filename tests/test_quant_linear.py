import pytest
import torch
from torch import nn

from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.formats import FORMATS
from llmquant.grid import AffineGrid


@pytest.mark.parametrize("bits,group_size,sym,bias", [(4, 32, True, False), (4, -1, False, True),
                                                      (3, 64, False, False), (8, 128, True, True), (2, 32, False, True)])
def test_gptq_linear_matches_linear_with_fake_quantized_weight(bits, group_size, sym, bias):
    torch.manual_seed(bits)
    linear = nn.Linear(160, 96, bias=bias)
    grid = AffineGrid(bits, sym, group_size, min_zero=0 if sym else 1)
    quantized = grid.quantize(linear.weight.detach())
    fmt = FORMATS["gptq"]
    tensors = fmt.pack(quantized, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    config = {"bits": bits, "group_size": group_size, "checkpoint_format": "gptq"}
    module = fmt.build_linear("layer", config, {k: tuple(v.shape) for k, v in tensors.items()}, bias, 160, 96, torch.float32)
    state = dict(tensors)
    if bias:
        state["bias"] = linear.bias.detach()
    module.load_state_dict(state, assign=True)
    reference = nn.Linear(160, 96, bias=bias)
    reference.weight.data = quantized.dequantize()
    if bias:
        reference.bias.data = linear.bias.detach()
    x = torch.randn(3, 5, 160)
    with ops.use_backend("reference"):  # the CPU fast paths compute in bf16 on x86: tests/test_cpu_fast.py
        assert torch.allclose(module(x), reference(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(module.dequantized_weight(), quantized.dequantize())
    packed_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    assert packed_bytes < 160 * 96 * 4 * (bits + 1) / 32 + 96 * 4  # about bits/32 of fp32, not the fp32 size
