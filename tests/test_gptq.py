import hashlib

import pytest
import torch

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.algorithms.gptq import gptq_quantize, inverse_hessian_factor
from llmquant.arch import arch_for
from llmquant.data import Calibration
from llmquant.errors import LlmquantError
from llmquant.grid import AffineGrid
from llmquant.inference.nn import GPTQLinear
from llmquant.quantization.pipeline import capture_block_inputs, collect_input_statistics, run_block

from conftest import tiny_model


@pytest.fixture(scope="module")
def real_layer_statistics(smollm2):
    """(weight, InputGram) of every linear in blocks 0, 12 and 24 of SmolLM2, on real wiki text."""
    model, tokenizer = smollm2
    arch = arch_for(model.config)
    samples = Calibration("wiki", nsamples=4, seqlen=256).windows(tokenizer)
    inputs = capture_block_inputs(model, arch, samples)
    hidden = inputs[0].hidden_states
    layers = []
    for index, block in enumerate(arch.block_list(model)):
        if index in (0, 12, 24):
            linears = {name: block.get_submodule(name) for name in arch.linear_names()}
            stats = collect_input_statistics(block, linears, hidden, inputs[index].kwargs)
            layers += [(f"{index}.{name}", linears[name].weight.detach().clone(), stats[name]) for name in linears]
        if index == 24:
            break
        hidden = run_block(block, hidden, inputs[index].kwargs)
    return layers


def hessian(stats):
    return 2 * stats.gram / stats.rows


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 64), (4, 128)])
def test_gptq_beats_rtn_on_real_layers_and_act_order_does_not_hurt(real_layer_statistics, bits, group_size):
    grid = AffineGrid(bits, symmetric=False, group_size=group_size, min_zero=1)
    plain_errors, act_order_errors = [], []
    for name, weight, stats in real_layer_statistics:
        rtn = stats.relative_output_error(weight, grid.quantize(weight).dequantize())
        plain = stats.relative_output_error(weight, gptq_quantize(weight, hessian(stats), grid).dequantize())
        ordered = stats.relative_output_error(
            weight, gptq_quantize(weight, hessian(stats), grid, act_order=True).dequantize())
        assert plain < rtn, f"{name}: GPTQ {plain:.5f} vs RTN {rtn:.5f}"
        plain_errors.append(plain)
        act_order_errors.append(ordered)
    assert sum(act_order_errors) <= sum(plain_errors)


def test_dead_columns_and_singular_hessian_are_healed_with_a_warning():
    torch.manual_seed(0)
    x = torch.randn(20, 64)  # 20 rows for 64 columns: rank-deficient
    x[:, [3, 17, 40]] = 0  # dead input columns
    h = 2 * x.t() @ x / 20
    weight = torch.randn(32, 64)
    grid = AffineGrid(4, False, 32, min_zero=1)
    with pytest.warns(RuntimeWarning, match="layer.x: Hessian not positive-definite with damp 0; used damp"):
        quantized = gptq_quantize(weight, h, grid, damp=0.0, layer_name="layer.x")
    restored = quantized.dequantize()
    assert torch.isfinite(restored).all()
    assert (restored[:, [3, 17, 40]] == 0).all()  # dead columns are zeroed, as the reference does
    with pytest.warns(RuntimeWarning):
        ordered = gptq_quantize(weight, h, grid, damp=0.0, act_order=True)
    assert torch.isfinite(ordered.dequantize()).all()


def test_hopeless_hessian_gives_a_clear_error():
    h = torch.full((8, 8), float("nan"))
    with pytest.raises(LlmquantError, match="blk.q_proj: the Hessian stays singular"):
        inverse_hessian_factor(h, 0.01, "blk.q_proj")


def test_static_groups_keep_natural_group_index_under_act_order():
    torch.manual_seed(0)
    x = torch.randn(200, 96) * torch.linspace(0.1, 3, 96)
    weight = torch.randn(48, 96)
    grid = AffineGrid(4, True, 32)
    dynamic = gptq_quantize(weight, 2 * x.t() @ x / 200, grid, act_order=True)
    static = gptq_quantize(weight, 2 * x.t() @ x / 200, grid, act_order=True, static_groups=True)
    assert torch.equal(static.group_index, torch.arange(96, dtype=torch.int32) // 32)
    assert not torch.equal(dynamic.group_index, static.group_index)
    assert sorted(torch.bincount(dynamic.group_index).tolist()) == [32, 32, 32]


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_checkpoint_loads_with_the_fake_quantized_logits(tmp_path, act_order, static_groups):
    model = tiny_model("llama")
    config = QuantConfig(method="gptq", bits=4, group_size=32, sym=False, dtype="float32",
                         act_order=act_order, static_groups=static_groups)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    qmodel = llmquant.quantize(model, config, calib=calib, progress=False)
    qmodel.save(tmp_path / "ckpt")
    loaded = llmquant.load(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad(), ops.use_backend("reference"):  # the checkpoint's exact numerics; the CPU fast path: test_cpu_fast.py
        assert torch.allclose(loaded(ids).logits, qmodel.model(ids).logits, atol=1e-5)
    g_idx = loaded.model.layers[0].self_attn.q_proj.g_idx
    monotonic = bool((g_idx[1:] >= g_idx[:-1]).all())
    assert monotonic == (not act_order or static_groups)
    assert loaded.config.quantization_config["desc_act"] is act_order
    assert isinstance(loaded.model.layers[1].mlp.down_proj, GPTQLinear)


def test_same_seed_and_data_give_a_bit_identical_checkpoint(tmp_path):
    digests = []
    for run in range(2):
        qmodel = llmquant.quantize(tiny_model("gemma3", seed=3), QuantConfig(method="gptq", bits=4, group_size=32),
                                   calib=torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(7)),
                                   progress=False)
        folder = qmodel.save(tmp_path / f"run{run}")
        digests.append(hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_gptq_options_are_validated():
    from llmquant.errors import ConfigError

    with pytest.raises(ConfigError, match=r"act_order and static_groups apply to methods gptq, awq\+gptq"):
        QuantConfig(method="rtn", act_order=True)
    with pytest.raises(ConfigError, match="damp must be"):
        QuantConfig(method="gptq", damp=-0.1)


def test_cli_gptq_with_act_order_writes_desc_act_and_layer_errors(tmp_path, smollm2):
    import json

    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from llmquant.cli import main

    config = tiny_config("llama")
    config.vocab_size = len(smollm2[1])  # the borrowed SmolLM2 tokenizer's ids must fit
    folder = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--method", "gptq", "--bits", "3", "--group-size", "32", "--asym",
                 "--act-order", "--nsamples", "3", "--seqlen", "48", "--out", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["desc_act"], qc["bits"], qc["sym"], qc["meta"]["method"]) == (True, 3, False, "gptq")
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["calibration"] == {"corpus": "wiki", "split": "train", "nsamples": 3, "seqlen": 48, "seed": 0}
    assert all(0 < layer["relative_output_error"] < 1 for layer in report["layers"])
    assert isinstance(llmquant.load(out).model.layers[0].self_attn.o_proj, GPTQLinear)


@pytest.mark.parametrize("group_size", [32, 96, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_batch_size_does_not_change_codes_or_scales(group_size, act_order):
    """The lazy batch only defers arithmetic: a group that spans a batch boundary (group 96 with
    batches of 64 or 128) must take its scales from weights that carry every earlier column's
    error update, exactly as with batches that end on the group's first column."""
    torch.manual_seed(0)
    x = torch.randn(512, 384) * torch.linspace(0.2, 3, 384)
    hess = 2 * x.t() @ x / 512
    weight = torch.randn(64, 384)
    grid = AffineGrid(4, False, group_size, min_zero=1)
    results = [gptq_quantize(weight, hess, grid, block_size=b, act_order=act_order)
               for b in (32, 64, 128)]
    for other in results[1:]:
        assert torch.equal(other.group_index, results[0].group_index)
        # equal up to floating-point ties: one fp16 step of a scale, a code in a thousand
        assert torch.allclose(other.scale, results[0].scale, rtol=2e-3, atol=0)
        assert (other.codes != results[0].codes).float().mean() <= 1e-3


def test_gptq_lazy_batch_option_cannot_be_mistaken_for_nf4_block_size(capsys, tmp_path):
    from llmquant.cli import build_parser, main

    args = build_parser().parse_args(["quantize", "--method", "gptq", "--gptq-block-size", "64", "--out", "x"])
    assert args.gptq_block_size == 64 and args.group_size is None
    assert build_parser().parse_args(["quantize", "--method", "nf4", "--blocksize", "128", "--out", "x"]).group_size == 128
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "nf4", "--block-size", "128", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "--block-size is now --gptq-block-size" in err and "--group-size" in err
    assert not (tmp_path / "out").exists()
    assert QuantConfig(method="gptq", gptq_block_size=32).gptq_block_size == 32
