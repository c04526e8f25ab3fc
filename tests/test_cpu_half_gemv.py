"""Whether one-row products run in float16 is measured per CPU (capability.half_gemv_is_faster): where it
is not the faster, NF4 / FP4 decode runs on the fp32 copy and the output head on its own fp32 forward;
the override is checked."""
import pytest
import torch
from torch import nn

from llmquant.inference.cpu import capability, prepare_for_cpu, prepare_output_head
from llmquant.errors import ConfigError
from test_cpu_stacked import nf4_linear


@pytest.mark.parametrize("variable, choice", [(capability.HALF_GEMV_ENV, capability.half_gemv_is_faster),
                                              (capability.HALF_GEMM_ENV, capability.half_gemm_is_faster)])
def test_the_choice_is_measured_once_per_thread_count_and_can_be_overridden(monkeypatch, variable, choice):
    monkeypatch.setenv(variable, "auto")
    gains = capability.half_gains(torch.get_num_threads())
    assert gains[0] > 0 and capability.half_gains(torch.get_num_threads()) == gains  # cached
    gain = gains[0] if variable == capability.HALF_GEMV_ENV else gains[1]
    has_gemm = variable == capability.HALF_GEMV_ENV or capability.fbgemm_half.available()
    assert choice() == (has_gemm and gain >= capability.HALF_GEMV_MIN_GAIN)
    for value, expected in (("on", has_gemm), ("off", False)):
        monkeypatch.setenv(variable, value)
        assert choice() is expected
    monkeypatch.setenv(variable, "fast")
    if has_gemm:
        with pytest.raises(ConfigError, match=variable):
            choice()


def _row_products(module, x):
    """The dtypes torch.nn.functional.linear is called with while `module` runs on x."""
    seen = []
    linear = torch.nn.functional.linear

    def spy(inp, weight, bias=None):
        seen.append((inp.dtype, weight.dtype))
        return linear(inp, weight, bias)

    torch.nn.functional.linear = spy
    try:
        module(x)
    finally:
        torch.nn.functional.linear = linear
    return seen


@pytest.mark.parametrize("half", ["on", "off"])
def test_nf4_decode_rows_take_float16_only_where_it_is_faster(monkeypatch, half):
    monkeypatch.setenv(capability.HALF_GEMV_ENV, half)
    model = nn.Sequential(nf4_linear(64, 128, seed=0))
    prepare_for_cpu(model, dtype=torch.float32)
    module = model[0]
    kernel = module.prepared.kernel
    assert (kernel.dense_fp32.kept is not None) == (half == "off" or not capability.has_fast_bf16_matmul())
    x = torch.randn(1, 128)
    expected = x @ module.dequantized_weight().t()
    with torch.no_grad():
        got = module(x)
        products = _row_products(module, x)
    assert products == [(torch.float16, torch.float16)] if half == "on" else products == [(torch.float32, torch.float32)]
    tolerance = 2e-3 if half == "on" else 1e-5
    assert (got - expected).abs().max() <= tolerance * expected.abs().max()


def test_the_head_keeps_its_fp32_forward_where_float16_is_not_faster(monkeypatch):
    head = nn.Linear(32, 100, bias=False)
    with torch.no_grad():
        head.weight.copy_(head.weight.half().float())  # float16 numbers: the gemv would apply
    model = nn.Module()
    model.get_output_embeddings = lambda: head
    monkeypatch.setenv(capability.HALF_GEMV_ENV, "off")
    assert prepare_output_head(model) is None and "forward" not in head.__dict__
    monkeypatch.setenv(capability.HALF_GEMV_ENV, "on")
    assert prepare_output_head(model) is not None and "forward" in head.__dict__
    monkeypatch.setenv(capability.HALF_GEMV_ENV, "off")  # prepared again where it is not the faster
    assert prepare_output_head(model) is None and "forward" not in head.__dict__
