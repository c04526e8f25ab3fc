"""GPTQ's first-token weight: each calibration window's first token (the attention sink) counted W
times in the Hessian."""
from __future__ import annotations

import pytest
import torch

from llmquant import QuantConfig
from llmquant.algorithms import algorithm_for
from llmquant.algorithms.statistics import InputGram
from llmquant.errors import ConfigError


def test_the_first_token_of_each_window_counts_w_times_in_the_gram():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    weighted = InputGram(8, first_token_weight=4.0)
    weighted.add_batch(x)
    rows = torch.cat([x.reshape(-1, 8)] + [x[:, 0]] * 3)  # the first rows three more times
    assert torch.allclose(weighted.gram, rows.t() @ rows, atol=1e-5)
    assert weighted.rows == 15  # the row count (and the channel statistics) are the inputs'
    plain = InputGram(8)
    plain.add_batch(x)
    assert torch.equal(plain.channel_abs_max, weighted.channel_abs_max)
    assert torch.allclose(weighted.rescaled(torch.full((8,), 2.0)).gram, weighted.gram / 4)
    flat = InputGram(8, first_token_weight=4.0)  # 2-D inputs (routed experts' tokens) have no first token
    flat.add_batch(x.reshape(-1, 8))
    assert torch.allclose(flat.gram, plain.gram)


def test_the_option_reaches_the_statistics_of_gptq_and_awq_gptq_only():
    assert algorithm_for(QuantConfig(method="gptq", first_token_weight=10)).statistics_options == \
        {"first_token_weight": 10}
    assert algorithm_for(QuantConfig(method="awq+gptq", first_token_weight=10)).statistics_options == \
        {"first_token_weight": 10}
    assert algorithm_for(QuantConfig(method="gptq")).statistics_options == {}
    with pytest.raises(ConfigError, match="first_token_weight applies to methods gptq, awq\\+gptq, not 'rtn'"):
        QuantConfig(method="rtn", first_token_weight=10)
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="first_token_weight must be a positive number"):
            QuantConfig(method="gptq", first_token_weight=bad)


def test_a_weighted_run_rounds_differently_and_records_the_setting(tmp_path):
    """Through the pipeline: the weight changes the rounding (the option reaches the Grams GPTQ reads),
    and the checkpoint's recorded recipe says it."""
    import json

    import llmquant
    from llmquant.evaluation.report import recipe_rows
    from test_pipeline import tiny_model

    torch.manual_seed(0)
    calib = torch.randint(0, 128, (4, 16))
    weights = {}
    for weight in (1.0, 50.0):
        config = QuantConfig(method="gptq", bits=3, group_size=32, dtype="float32", first_token_weight=weight)
        qmodel = llmquant.quantize(tiny_model("llama"), config, calib=calib, out=tmp_path / f"w{weight}",
                                   progress=False)
        weights[weight] = qmodel.model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    assert not torch.equal(weights[1.0], weights[50.0])
    report = json.loads((tmp_path / "w50.0" / "quantize_report.json").read_text())
    assert ("first-token weight", "50.0") in recipe_rows(report)
    assert ("first-token weight", "1.0") in recipe_rows(json.loads((tmp_path / "w1.0" / "quantize_report.json").read_text()))
