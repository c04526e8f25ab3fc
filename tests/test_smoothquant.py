"""SmoothQuant and W8A8: smoothing preserves the function, observers do what they say, the int8
module accumulates exactly, and the compressed-tensors checkpoint reads back."""
import copy
import json

import pytest
import torch
from safetensors import safe_open

import llmquant
from llmquant import QuantConfig
from llmquant.algorithms.smoothquant import SmoothQuant
from llmquant.arch import arch_for
from llmquant.errors import ConfigError
from llmquant.grid import AffineGrid
from llmquant.grid.activations import fake_quantize, quantize_per_token
from llmquant.grid.observers import AbsHistogram, expected_squared_error, kl_threshold, minmax_threshold, \
    mse_threshold, percentile_threshold
from llmquant.inference.nn import W8A8Linear
from llmquant.inference.ops import int8_matmul
from llmquant.quantization.pipeline import _transform_block, capture_block_inputs, run_block

from conftest import tiny_model

TEXT = ("The Amazon River in South America is the largest river by discharge volume of water in the world, "
        "and the disputed longest river system in the world in comparison to the Nile.")


def smooth_every_block(model, samples, alpha):
    arch = arch_for(model.config)
    inputs = capture_block_inputs(model, arch, samples)
    hidden = inputs[0].hidden_states
    grid = AffineGrid(8, symmetric=True, group_size=-1)
    records = []
    for index, block in enumerate(arch.block_list(model)):
        outcome = _transform_block(SmoothQuant(alpha), block, arch, arch.block_prefix(index),
                                   lambda name, linear: grid, hidden, inputs[index].kwargs)
        records.extend(outcome.records)
        hidden = run_block(block, hidden, inputs[index].kwargs)
    return records


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothing_alone_keeps_smollm2_logits(smollm2, alpha):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    records = smooth_every_block(model, ids, alpha)
    assert len(records) == 3 * model.config.num_hidden_layers
    # Outliers move into the weights: the largest smoothed activation is smaller.
    assert sum(r["input_abs_max_after"] < r["input_abs_max_before"] for r in records) > len(records) // 2
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=2e-3, rtol=1e-4), (after - before).abs().max()


@pytest.mark.parametrize("kind", ["gemma3", "opt"])
def test_smoothing_alone_keeps_tiny_model_logits(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    smooth_every_block(model, ids, 0.8)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-4)


def histogram_of(*batches):
    histogram = AbsHistogram()
    for batch in batches:
        histogram.add(batch)
    return histogram


def test_histogram_keeps_every_value_when_its_range_grows():
    torch.manual_seed(0)
    small, large = torch.rand(10_000), torch.rand(10_000) * 50
    histogram = histogram_of(small, large)  # the second batch doubles the range several times
    assert histogram.counts.sum() == 20_000
    assert histogram.absmax == pytest.approx(float(large.max()))
    assert histogram.range >= histogram.absmax


def test_minmax_is_the_largest_magnitude_and_percentile_the_quantile():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    histogram = histogram_of(x[:100_000], x[100_000:])
    assert minmax_threshold(histogram) == pytest.approx(float(x.abs().max()))
    expected = float(torch.quantile(x.abs()[:100_000], 0.99))  # torch.quantile caps its input size
    assert percentile_threshold(histogram, 99.0) == pytest.approx(expected, rel=0.02)


def test_mse_and_kl_clip_a_heavy_tailed_distribution_but_not_a_uniform_one():
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(4.0).sample((400_000,))  # finite variance, rare large values
    histogram = histogram_of(heavy)
    absmax = minmax_threshold(histogram)
    mse, kl = mse_threshold(histogram), kl_threshold(histogram)
    assert mse < 0.8 * absmax and kl < 0.6 * absmax
    # The MSE threshold is a minimum of the expected error over thresholds, by definition.
    assert expected_squared_error(histogram, mse) < expected_squared_error(histogram, absmax)
    assert expected_squared_error(histogram, mse) <= expected_squared_error(histogram, 0.8 * mse)
    uniform = histogram_of(torch.rand(400_000) * 2 - 1)
    assert mse_threshold(uniform) > 0.97 * minmax_threshold(uniform)
    assert kl_threshold(uniform) > 0.97 * minmax_threshold(uniform)


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_module_accumulates_in_integers_exactly(static):
    torch.manual_seed(0)
    linear = W8A8Linear(96, 40, static=static, bias=True, dtype=torch.float32)
    linear.weight.copy_(torch.randint(-128, 128, (40, 96), dtype=torch.int8))
    linear.weight_scale.copy_(torch.rand(40, 1) * 0.01 + 1e-3)
    linear.bias.copy_(torch.randn(40))
    if static:
        linear.input_scale.copy_(torch.tensor([0.02]))
    x = torch.randn(3, 5, 96)
    rows = x.reshape(-1, 96)
    if static:
        codes = torch.clamp(torch.round(rows / 0.02), -128, 127).to(torch.int8)
        x_scale = torch.full((15, 1), 0.02)
    else:
        codes, x_scale = quantize_per_token(rows)
    exact = codes.long() @ linear.weight.long().t()
    assert torch.equal(int8_matmul(codes, linear.weight).long(), exact)
    fake = (codes.double() * x_scale.double()) @ (linear.weight.double() * linear.weight_scale.double()).t()
    expected = (fake + linear.bias.double()).reshape(3, 5, 40)
    assert torch.allclose(linear(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,act_quant,observer", [
    ("w8a8", "dynamic", "minmax"),
    ("smoothquant", "static", "kl"),
    ("smoothquant", "static", "percentile"),
])
def test_compressed_tensors_checkpoint_reads_back_and_generates(method, act_quant, observer, tmp_path):
    model = tiny_model("llama")
    config = QuantConfig(method=method, act_quant=act_quant, observer=observer, dtype="float32")
    qmodel = llmquant.quantize(model, config, calib=torch.randint(0, 128, (4, 32)), progress=False)
    folder = qmodel.save(tmp_path / "ckpt")
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors" and saved["format"] == "int-quantized"
    scheme = saved["config_groups"]["group_0"]
    assert scheme["weights"]["strategy"] == "channel" and scheme["weights"]["num_bits"] == 8
    assert scheme["input_activations"]["dynamic"] == (act_quant == "dynamic")
    assert scheme["input_activations"]["strategy"] == ("token" if act_quant == "dynamic" else "tensor")
    name = "model.layers.0.mlp.down_proj"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        assert f.get_tensor(f"{name}.weight_scale").shape == (64, 1)
        assert (f"{name}.input_scale" in f.keys()) == (act_quant == "static")
    loaded = llmquant.load(folder)
    module = loaded.get_submodule(name)
    assert isinstance(module, W8A8Linear) and module.static == (act_quant == "static")
    # The stored int8 weights are the weights the algorithm produced.
    assert torch.equal(module.dequantized_weight(), qmodel.model.get_submodule(name).weight.float())
    x = torch.randn(7, 128)
    expected = fake_quantize(x, module.input_scale) @ module.dequantized_weight().t()
    assert torch.allclose(module(x), expected, rtol=1e-4, atol=1e-5)
    output = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="smoothquant", bits=4), "symmetric int8 per output channel"),
    (dict(method="w8a8", sym=False), "symmetric int8 per output channel"),
    (dict(method="w8a8", observer="kl"), "use it with act_quant 'static'"),
    (dict(method="rtn", act_quant="static"), "apply to methods that quantize activations"),
    (dict(method="smoothquant", alpha=1.5), "alpha must be"),
    (dict(method="gptq", alpha=0.8), "alpha applies to method smoothquant"),
    (dict(method="w8a8", format="gptq"), "use --format compressed-tensors"),
    (dict(method="rtn", format="compressed-tensors"), "not 'rtn'"),
])
def test_w8a8_settings_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def test_w8a8_defaults_follow_the_method():
    config = QuantConfig(method="smoothquant")
    assert (config.bits, config.group_size, config.format) == (8, -1, "compressed-tensors")
    assert (QuantConfig().bits, QuantConfig().group_size, QuantConfig().format) == (4, 128, "gptq")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folding_in_half_precision_is_the_float32_fold_cast_once(dtype):
    """Scales are folded in float32 and each result cast once to the model's dtype: a large scale is
    neither rounded to fp16 / bf16 first (which breaks the norm / linear balance, Gemma's (1 + w)
    norms included) nor overflows fp16."""
    from llmquant.algorithms.scaling import scaling_groups

    model = tiny_model("gemma3").to(dtype)
    reference = copy.deepcopy(model).float()
    arch = arch_for(model.config)
    names = {f"{arch.block_prefix(0)}.{n}" for n in arch.linear_names()}
    folded = []
    for m in (model, reference):
        groups = scaling_groups(arch.block_list(m)[0], arch, arch.block_prefix(0), names)
        assert groups and any(not isinstance(g.previous, torch.nn.Linear) for g in groups)
        for group in groups:
            scales = 10 ** (torch.rand(group.channels, generator=torch.Generator().manual_seed(len(group.name))) * 6 - 1)
            group.fold(scales)  # up to 1e5: beyond fp16's largest value
            if m is reference:  # its tensors hold the model's values after each fold too
                with torch.no_grad():
                    for p in m.parameters():
                        p.copy_(p.to(dtype).float())
        folded.append(arch.block_list(m)[0].state_dict())
    for key, value in folded[0].items():
        assert value.dtype == dtype
        assert torch.equal(value, folded[1][key].to(dtype)), key


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_searched_and_applied_scales_use_the_same_weights_when_a_linear_is_excluded(alpha):
    """A linear kept in floating point (--exclude) is rescaled with its group but does not shape the
    scales: the alpha search and the applied scales both use the quantized linears' weights."""
    from llmquant.algorithms.smoothquant import ALPHA_GRID, smoothing_scales, w8a8_output_error
    from llmquant.algorithms.scaling import ScalingGroup
    from llmquant.algorithms.statistics import InputGram

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    kept, excluded = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    with torch.no_grad():
        excluded.weight.mul_(100)  # its column maxima would dominate the scales
    x = torch.randn(256, 16) * torch.linspace(0.1, 20, 16)
    stats = InputGram(16, keep_rows=256)
    stats.add_batch(x)
    before = kept.weight.detach().clone()
    group = ScalingGroup("norm", norm, {"kept": kept, "excluded": excluded}, ("kept",), stats)
    grid = AffineGrid(8, symmetric=True, group_size=-1)
    outcome = SmoothQuant(alpha).transform_block([group], lambda name, linear: grid, set())
    chosen = outcome.records[0]["alpha"]
    applied = (kept.weight / before)[0]
    expected = smoothing_scales(stats.channel_abs_max, [before], chosen)
    assert torch.allclose(applied, expected, rtol=1e-5)
    if alpha == "auto":
        errors = {a: w8a8_output_error(x, [before], [grid], smoothing_scales(stats.channel_abs_max, [before], a), False)
                  for a in ALPHA_GRID}
        assert chosen == min(errors, key=errors.get)


def test_alpha_search_scores_the_group_as_the_sum_over_its_linears():
    """The search rounds the group's per-channel weights in one matrix and reuses X W^T across
    alphas: the score is still the sum of each linear's own output error."""
    from llmquant.algorithms.smoothquant import smoothing_scales, w8a8_output_error

    torch.manual_seed(0)
    x = torch.randn(128, 32) * torch.linspace(0.1, 8, 32)
    weights = [torch.randn(16, 32), torch.randn(24, 32) * 3]
    grid = AffineGrid(8, symmetric=True, group_size=-1)
    scales = smoothing_scales(x.abs().amax(0), weights, 0.6)
    for static in (False, True):
        separate = w8a8_output_error(x, weights, [grid, grid], scales, static)
        joined = torch.cat(weights)
        together = w8a8_output_error(x, [joined], [grid], scales, static, [x @ joined.t()])
        assert together == pytest.approx(separate, rel=1e-5)
