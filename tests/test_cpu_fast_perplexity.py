"""Real checkpoints of SmolLM2: perplexity through the CPU fast paths equals the reference path's."""
import pytest

import llmquant
from llmquant import Calibration, QuantConfig, ops
from llmquant.api import evaluate
from llmquant.cpu import prepare_for_cpu

pytestmark = pytest.mark.slow
WINDOWS = 3
CALIBRATION = Calibration("wiki", nsamples=4, seqlen=256)


@pytest.mark.parametrize("config,expected_path", [
    (QuantConfig(method="rtn", bits=4, group_size=128, sym=True), "int4pack"),
    (QuantConfig(method="rtn", bits=4, group_size=64, sym=False), "int4pack"),
    (QuantConfig(method="gptq", bits=4, group_size=128, act_order=True), "int4pack"),
    (QuantConfig(method="rtn", bits=4, group_size=64, sym=False, format="awq"), "int4pack"),
    (QuantConfig(method="rtn", bits=8, group_size=-1), "int8pack"),
    (QuantConfig(method="w8a8", act_quant="dynamic"), "w8a8"),
    (QuantConfig(method="w8a8", act_quant="static"), "w8a8"),
    (QuantConfig(method="nf4", double_quant=True), "dequantized"),
    (QuantConfig(method="fp4"), "dequantized"),
], ids=["gptq-sym-g128", "gptq-asym-g64", "gptq-actorder-g128", "awq-g64", "gptq-w8", "w8a8-dynamic",
        "w8a8-static", "nf4", "fp4"])
def test_fast_path_perplexity_equals_reference_within_a_tenth_of_a_percent(config, expected_path, tmp_path):
    calib = CALIBRATION if config.method == "gptq" or config.act_quant == "static" else None
    qmodel = llmquant.quantize("smollm2-135m", config, calib, progress=False)
    model = llmquant.load(qmodel.save(tmp_path / "ckpt"))
    assert {layer.path for layer in prepare_for_cpu(model)} == {expected_path}
    fast = evaluate(model, max_windows=WINDOWS, progress=False, tokenizer=qmodel.tokenizer)["perplexity"]
    with ops.use_backend("reference"):
        reference = evaluate(model, max_windows=WINDOWS, progress=False, tokenizer=qmodel.tokenizer)["perplexity"]
    assert abs(fast / reference - 1) < 1e-3, (fast, reference)
