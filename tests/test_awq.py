"""AWQ: function-preserving scale folding, the search itself, and the AWQ GEMM checkpoint layout."""
import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.algorithms import algorithm_for
from llmquant.algorithms.awq import search_clip_ranges, search_scales
from llmquant.arch import arch_for
from llmquant.errors import CheckpointError, ConfigError
from llmquant.grid import AffineGrid
from llmquant.inference.nn import AWQLinear
from llmquant.quantization.pipeline import PipelineResult, capture_block_inputs, quantize_block, run_block, \
    scaling_groups_with_statistics
from llmquant.algorithms.statistics import InputGram

from conftest import tiny_config, tiny_model

TEXT = ("The Amazon River in South America is the largest river by discharge volume of water in the world, "
        "and the disputed longest river system in the world in comparison to the Nile.")


def fold_searched_or_random_scales(model, samples, random_scales: bool):
    """Fold per-channel scales into every scaling pair of every block (quantizing nothing)."""
    arch = arch_for(model.config)
    inputs = capture_block_inputs(model, arch, samples)
    hidden = inputs[0].hidden_states
    grid = AffineGrid(4, symmetric=False, group_size=32)
    generator = torch.Generator().manual_seed(0)
    folded = 0
    for index, block in enumerate(arch.block_list(model)):
        groups = scaling_groups_with_statistics(block, arch, arch.block_prefix(index), lambda name, linear: grid,
                                                hidden, inputs[index].kwargs)
        next_hidden = run_block(block, hidden, inputs[index].kwargs)
        for group in groups:
            if random_scales:
                scales = torch.exp(torch.randn(group.channels, generator=generator))
            else:
                weights = [group.linears[n].weight for n in group.quantized]
                scales = search_scales(weights, [grid] * len(weights), group.statistics, n_grid=10)[0]
            group.fold(scales)
            folded += 1
        hidden = next_hidden
    return folded


# The searched scales run AWQ's search over all 30 blocks (~1-2 min): in the slow suite; random ones check the
# same folding in the fast one.
@pytest.mark.parametrize("random_scales", [pytest.param(False, marks=pytest.mark.slow), True])
def test_folding_scales_keeps_smollm2_logits(smollm2, random_scales):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    folded = fold_searched_or_random_scales(model, ids, random_scales)
    # SmolLM2 uses grouped-query attention (9 query, 3 kv heads): v -> o does not fit, 3 pairs per block.
    assert folded == 3 * model.config.num_hidden_layers
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=2e-3, rtol=1e-4), (after - before).abs().max()
    assert not torch.equal(after, before)  # something was folded


@pytest.mark.parametrize("kind", ["llama", "gemma3", "opt"])
def test_folding_random_scales_keeps_tiny_model_logits(kind):
    config = tiny_config(kind)
    if kind == "llama":  # no grouped-query attention here, so v -> o is folded as well
        config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    folded = fold_searched_or_random_scales(model, ids, random_scales=True)
    expected_pairs = {"llama": 4, "gemma3": 3, "opt": 4}[kind]
    assert folded == expected_pairs * model.config.num_hidden_layers
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()


def gram_of(x):
    stats = InputGram(x.shape[1])
    stats.add_batch(x)
    return stats


def test_scale_search_starts_at_plain_rounding_and_protects_a_salient_channel():
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    x[:, 5] *= 40  # one input channel carries large activations
    weight = torch.randn(32, 64) * 0.02
    grid = AffineGrid(4, symmetric=False, group_size=-1)
    stats = gram_of(x)
    scales, ratio, baseline, best = search_scales([weight], [grid], stats, n_grid=20)
    rtn_error = stats.output_energy(weight - grid.fake_quantize(weight))
    assert baseline == pytest.approx(rtn_error, rel=1e-6)
    assert ratio > 0 and best < 0.7 * baseline
    assert scales.argmax() == 5


def test_clip_search_shrinks_heavy_tailed_groups_and_lowers_output_error():
    torch.manual_seed(0)
    x = torch.randn(4096, 128)
    weight = torch.distributions.Laplace(0.0, 1.0).sample((64, 128))
    grid = AffineGrid(3, symmetric=True, group_size=64)
    stats = gram_of(x)
    low, high = search_clip_ranges(weight, grid, stats.gram)
    original_low, original_high = weight.view(64, 2, 64).amin(-1), weight.view(64, 2, 64).amax(-1)
    assert torch.all(high <= original_high) and torch.all(low >= original_low)
    assert torch.all(high >= 0.5 * original_high - 1e-6)  # shrunk by at most the grid's 0.5
    assert (high < original_high).float().mean() > 0.5  # most heavy-tailed groups are clipped
    clipped = torch.maximum(torch.minimum(weight, high.repeat_interleave(64, 1)), low.repeat_interleave(64, 1))
    assert stats.output_energy(weight - grid.fake_quantize(clipped)) < 0.9 * stats.output_energy(
        weight - grid.fake_quantize(weight))


def block_output_error(block, arch, prefix, algorithm, grid, hidden, kwargs, fp_output):
    block = copy.deepcopy(block)
    quantize_block(block, prefix, arch, algorithm, lambda name, linear: grid, lambda *args: None,
                   arch.sequential, hidden, kwargs, PipelineResult())
    output = run_block(block, hidden, kwargs)
    return sum(float((o - f).pow(2).sum()) for o, f in zip(output, fp_output))


def test_awq_block_output_error_is_below_rtn_on_real_smollm2_blocks(smollm2):
    from llmquant.data import Calibration

    model, tokenizer = smollm2
    arch = arch_for(model.config)
    samples = Calibration(nsamples=8, seqlen=256).windows(tokenizer)
    inputs = capture_block_inputs(model, arch, samples)
    hidden = inputs[0].hidden_states
    grid = AffineGrid(4, symmetric=False, group_size=-1)
    rtn = algorithm_for(QuantConfig(method="rtn"))
    awq = algorithm_for(QuantConfig(method="awq"))
    blocks = arch.block_list(model)
    for index in range(3):
        block, kwargs, prefix = blocks[index], inputs[index].kwargs, arch.block_prefix(index)
        fp_output = run_block(block, hidden, kwargs)
        rtn_error = block_output_error(block, arch, prefix, rtn, grid, hidden, kwargs, fp_output)
        awq_error = block_output_error(block, arch, prefix, awq, grid, hidden, kwargs, fp_output)
        assert awq_error < rtn_error, f"block {index}: awq {awq_error:.4g} vs rtn {rtn_error:.4g}"
        hidden = fp_output


def published_awq_dequantize(qweight, qzeros, scales, group_size):
    """w[o, i] = (q[i, o] - z[i // gs, o]) * s[i // gs, o], where nibble k (bits 4k..4k+3) of
    qweight[i, c] holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][k], and the same for qzeros."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(words):
        words = words.numpy().astype(np.int64) & 0xFFFFFFFF
        rows, packed = words.shape
        values = np.zeros((rows, packed * 8), dtype=np.int64)
        for c in range(packed):
            for k in range(8):
                values[:, 8 * c + order[k]] = (words[:, c] >> (4 * k)) & 0xF
        return values

    codes, zeros = unpack(qweight), unpack(qzeros)
    groups = np.arange(codes.shape[0]) // group_size
    weight = (codes - zeros[groups]) * scales.float().numpy().astype(np.float64)[groups]
    return torch.from_numpy(weight.T).float()


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
@pytest.mark.parametrize("group_size,sym", [(32, False), (64, True), (-1, False)])
def test_awq_checkpoint_holds_the_quantized_weights_and_loads(method, group_size, sym, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 20))
    config = QuantConfig(method=method, bits=4, group_size=group_size, sym=sym, format="awq", dtype="float32")
    qmodel = llmquant.quantize(model, config, calib=torch.randint(0, 128, (4, 32)), progress=False)
    assert qmodel.pipeline.scaling and all(0 <= r["ratio"] < 1 for r in qmodel.pipeline.scaling)
    for name, packed in qmodel.packed.items():
        assert set(packed) == {"qweight", "qzeros", "scales"}
        in_features = qmodel.model.get_submodule(name).in_features
        width = in_features if group_size == -1 else group_size
        unpacked = published_awq_dequantize(packed["qweight"], packed["qzeros"], packed["scales"], width)
        assert torch.equal(unpacked, qmodel.model.get_submodule(name).weight.float()), name
    with torch.no_grad():
        fake_logits = qmodel.model(ids).logits
    qmodel.save(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "awq" and saved["version"] == "gemm" and saved["bits"] == 4
    assert saved["group_size"] == group_size and saved["zero_point"] == (not sym)
    loaded = llmquant.load(tmp_path / "ckpt")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, AWQLinear)
    with torch.no_grad(), ops.use_backend("reference"):  # the checkpoint's exact numerics; the CPU fast path: test_cpu_fast.py
        assert torch.allclose(loaded(ids).logits, fake_logits, atol=1e-5)
    report = json.loads((tmp_path / "ckpt" / "quantize_report.json").read_text())
    assert report["scaling"] and all(r["output_error_scaled"] <= r["output_error_unscaled"] for r in report["scaling"])
    assert all(0 < layer["relative_output_error"] < 1 for layer in report["layers"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=3), "the awq format holds 4-bit weights, not 3-bit; use --format gptq"),
    (dict(method="awq+gptq", act_order=True), "cannot store act-order"),
])
def test_awq_format_refuses_what_it_cannot_store(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**{"method": "awq", "format": "awq", **kwargs})


def test_awq_format_refuses_partial_groups_before_any_work():
    model = tiny_model("llama")  # in_features 64 and 128
    with pytest.raises(ConfigError, match="not a multiple of group_size 48"):
        llmquant.quantize(model, QuantConfig(method="awq", group_size=48, format="awq"),
                          calib=torch.randint(0, 128, (2, 16)), progress=False)


def test_awq_loader_rejects_tensors_that_disagree_with_the_config(tmp_path):
    model = tiny_model("llama")
    qmodel = llmquant.quantize(model, QuantConfig(method="rtn", group_size=32, format="awq"), progress=False)
    folder = qmodel.save(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="qzeros has shape .* needs"):
        llmquant.load(folder)


def test_calibration_tokens_outside_the_vocabulary_are_refused():
    with pytest.raises(ConfigError, match=r"calibration token ids must lie in \[0, 128\)"):
        llmquant.quantize(tiny_model("llama"), QuantConfig(method="awq", group_size=32), calib=torch.full((1, 8), 500),
                          progress=False)
