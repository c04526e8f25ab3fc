"""The quantization report (its numbers measured again on the checkpoint and the calibration data),
sensitivity, the knapsack allocation, and mixed-precision checkpoints through the loader."""
import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

import llmquant
from conftest import tiny_model
from llmquant import Calibration, QuantConfig
from llmquant.inference import ops
from llmquant.quantization.allocation import allocate, packed_bits
from llmquant.errors import ConfigError
from llmquant.quantization.sensitivity import SensitivityTable, measure_sensitivity
from llmquant.quantization.streaming import quantize_to_disk


def test_report_numbers_equal_those_measured_on_the_checkpoint_and_calibration(tmp_path, smollm2):
    """Each layer's reported errors against the same quantities measured here with plain matmuls: the
    saved linear (loaded, reference ops) against the source weight, on the inputs the loaded model
    gives that linear on the calibration windows. The pipeline computes them from its in-memory
    weights through each input's Gram matrix; agreement says the report describes the checkpoint."""
    source, tokenizer = smollm2
    calib = Calibration("wiki", 2, 64)
    out, _ = quantize_to_disk("smollm2-135m", QuantConfig(method="rtn", bits=3, group_size=64, sym=False), calib,
                              tmp_path / "ckpt", progress=False, plots=False)
    written = json.loads((out / "quantize_report.json").read_text())
    quantized = llmquant.load(out)
    linears = {name: module for name, module in quantized.named_modules() if hasattr(module, "dequantized_weight")}
    squared_error, output_energy = dict.fromkeys(linears, 0.0), dict.fromkeys(linears, 0.0)

    def measure(name):
        original = source.get_submodule(name)
        assert original.bias is None  # so the source output is x W^T and the energies compare as the report's

        def hook(module, args, output):
            expected = args[0].double() @ original.weight.double().t()
            squared_error[name] += float(((output.double() - expected) ** 2).sum())
            output_energy[name] += float((expected ** 2).sum())
        return hook

    handles = [module.register_forward_hook(measure(name)) for name, module in linears.items()]
    try:
        with torch.no_grad(), ops.use_backend("reference"):  # the file's fp32 numerics, not the CPU fast paths'
            for window in calib.windows(tokenizer):
                quantized(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert len(written["layers"]) == 210 and {layer["name"] for layer in written["layers"]} == set(linears)
    for layer in written["layers"]:
        name = layer["name"]
        original = source.get_submodule(name).weight.detach().double()
        restored = linears[name].dequantized_weight(torch.float32).double()
        weight_error = float(((restored - original) ** 2).sum() / (original ** 2).sum())
        assert output_energy[name] > 0, name
        output_error = squared_error[name] / output_energy[name]
        assert layer["relative_output_error"] == pytest.approx(output_error, rel=1e-3), name
        assert layer["relative_weight_error"] == pytest.approx(weight_error, rel=1e-4), name
        assert (layer["bits"], layer["group_size"]) == (3, 64)
    packed = sum(packed_bits(*layer["shape"], 3, 64) for layer in written["layers"]) / 8
    stored = sum(tensor.numel() * tensor.element_size() for file in out.glob("*.safetensors")
                 for key, tensor in load_file(file).items() if key.rsplit(".", 1)[0] in linears)
    assert written["quantized_layers_packed_bytes"] == packed == stored
    text = (out / "report.md").read_text()
    assert f"**{written['bits_per_weight']:.3f} bits per weight**" in text
    worst = max(written["layers"], key=lambda l: l["relative_output_error"])
    assert f"| {worst['name']} |" in text and f"{worst['relative_output_error']:.3e}" in text


@pytest.mark.slow
def test_report_command_draws_the_plots(tmp_path, smollm2, capsys):
    from llmquant.cli import main

    out, _ = quantize_to_disk("smollm2-135m", QuantConfig(method="awq", bits=4, group_size=64, sym=False),
                              Calibration("wiki", 2, 64), tmp_path / "awq", progress=False, plots=False)
    assert not (out / "errors_by_layer.png").exists()
    assert main(["report", str(out)]) == 0
    for figure in ("errors_by_layer.png", "errors_by_block.png", "weight_histogram.png", "activation_outliers.png"):
        assert (out / figure).stat().st_size > 5000 and f"]({figure})" in (out / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2


def _synthetic_table(rng):
    shapes = {("a.q", "a.k"): [[64, 128], [32, 128]], ("a.o",): [[128, 64]], ("b.up",): [[256, 128]]}
    rows = []
    for modules, group_shapes in shapes.items():
        for bits, group in itertools.product((2, 3, 4, 8), (32, 64, -1)):
            rows.append({"modules": list(modules), "shapes": group_shapes, "parameters": sum(o * i for o, i in group_shapes),
                         "bits": bits, "group_size": group, "delta_loss": float(rng.uniform(0, 1) * 2.0 ** -bits)})
            rows[-1]["kl"] = rows[-1]["delta_loss"] * 0.5
    return SensitivityTable(3.0, False, None, rows)


@pytest.mark.parametrize("target", [2.6, 3.3, 4.25, 5.0])
def test_allocation_respects_the_budget_and_is_optimal(target):
    import numpy as np

    table = _synthetic_table(np.random.default_rng(int(target * 100)))
    allocation = allocate(table, target, metric="delta_loss")
    groups = table.groups()
    parameters = sum(rows[0]["parameters"] for rows in groups.values())
    chosen = sum(packed_bits(*shape, *allocation.choices[modules[0]])
                 for modules, rows in groups.items() for shape in rows[0]["shapes"])
    assert chosen / parameters == pytest.approx(allocation.bits_per_weight) and chosen <= target * parameters
    best = min(
        (sum(r["delta_loss"] for r in combo), combo) for combo in itertools.product(*groups.values())
        if sum(packed_bits(*s, r["bits"], r["group_size"]) for r in combo for s in r["shapes"]) <= target * parameters * 0.999
    )
    assert allocation.predicted_delta_loss <= best[0] + 1e-12
    for modules in groups:  # linears a serving engine fuses share their setting
        assert len({allocation.choices[m] for m in modules}) == 1


def test_allocation_refuses_a_budget_below_the_cheapest_choice():
    import numpy as np

    with pytest.raises(ConfigError, match="below the cheapest"):
        allocate(_synthetic_table(np.random.default_rng(0)), 1.5)


def test_sensitivity_rises_as_bits_fall_and_only_storable_candidates_are_measured():
    from llmquant.arch import arch_for

    model = tiny_model("llama")
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = float(model(input_ids=windows, labels=windows).loss)

    def check_layer(name, out_features, in_features, bits, group_size):
        if bits == 3 and group_size == 32:
            raise ConfigError("not storable")

    table = measure_sensitivity(model, arch_for(model.config), windows, bits=(2, 3, 8), group_sizes=(32, -1),
                                check_layer=check_layer, progress=False)
    assert table.base_loss == pytest.approx(expected, rel=1e-5)
    assert len(table.rows) == 2 * 4 * 5  # blocks x groups x storable candidates
    by = {(tuple(r["modules"]), r["bits"], r["group_size"]): r["delta_loss"] for r in table.rows}
    assert sum(abs(v) for (_, b, _), v in by.items() if b == 2) > 20 * sum(abs(v) for (_, b, _), v in by.items() if b == 8)
    # one row checked against the whole model run with only that group quantized
    from llmquant.grid import AffineGrid

    modules = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    with torch.no_grad():
        for name in modules:
            weight = model.get_submodule(name).weight
            weight.data = AffineGrid(2, False, 32).quantize(weight.data).dequantize(weight.dtype)
        quantized_loss = float(model(input_ids=windows, labels=windows).loss)
    assert table.base_loss + by[(modules, 2, 32)] == pytest.approx(quantized_loss, rel=1e-5)
    assert all(r["kl"] >= 0 for r in table.rows)
    kl = {(tuple(r["modules"]), r["bits"], r["group_size"]): r["kl"] for r in table.rows}
    assert sum(v for (_, b, _), v in kl.items() if b == 2) > 100 * sum(v for (_, b, _), v in kl.items() if b == 8)


def test_gptq_sensitivity_rounds_each_group_with_hessians_from_the_statistics_windows(tmp_path):
    from llmquant.algorithms import GPTQ, algorithm_for
    from llmquant.arch import arch_for
    from llmquant.grid import AffineGrid
    from llmquant.algorithms.statistics import InputGram

    model = tiny_model("llama")
    arch = arch_for(model.config)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    statistics_windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    gptq = measure_sensitivity(model, arch, windows, bits=(2,), group_sizes=(32,), progress=False, algorithm=GPTQ(),
                               statistics_windows=statistics_windows)
    rtn = measure_sensitivity(model, arch, windows, bits=(2,), group_sizes=(32,), progress=False)
    assert (gptq.method, rtn.method) == ("gptq", "rtn")
    gptq.save(tmp_path / "t.json")
    assert SensitivityTable.load(tmp_path / "t.json").method == "gptq"
    # the row of block 1's gate/up, against the whole model with only that group GPTQ-rounded on
    # the Hessian of its full-precision input over the statistics windows
    modules = ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    block = model.model.layers[1]
    gram = InputGram(block.mlp.gate_proj.in_features)
    handle = block.mlp.gate_proj.register_forward_pre_hook(lambda module, args: gram.add_batch(args[0]))
    with torch.no_grad():
        model(input_ids=statistics_windows)
        handle.remove()
        reference = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        for name in modules:
            weight = model.get_submodule(name).weight
            weight.data = GPTQ().quantize(weight.data, AffineGrid(2, False, 32), gram, name).dequantize(weight.dtype)
        quantized = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
    kl = float((reference.exp() * (reference - quantized)).sum(-1).mean())
    row = next(r for r in gptq.rows if tuple(r["modules"]) == modules)
    assert row["kl"] == pytest.approx(kl, rel=1e-3)
    assert sum(r["kl"] for r in gptq.rows) < sum(r["kl"] for r in rtn.rows)
    with pytest.raises(ConfigError, match="not awq"):
        measure_sensitivity(model, arch, windows, progress=False, algorithm=algorithm_for(QuantConfig(method="awq")))


def test_mixed_precision_checkpoint_loads_with_per_module_settings(tmp_path):
    model = tiny_model("llama")
    overrides = {f"model.layers.0.self_attn.{p}_proj": {"bits": 8, "group_size": 32} for p in "qkv"}
    overrides["model.layers.1.mlp.down_proj"] = {"bits": 3, "group_size": -1}
    config = QuantConfig(method="gptq", bits=4, group_size=64, layer_overrides=overrides)
    qmodel = llmquant.quantize(model, config, torch.randint(0, 128, (4, 32)), progress=False)
    out = qmodel.save(tmp_path / "mixed")
    dynamic = json.loads((out / "config.json").read_text())["quantization_config"]["dynamic"]
    assert dynamic[r"+:^model\.layers\.1\.mlp\.down_proj$"] == {"bits": 3, "group_size": -1} and len(dynamic) == 4
    loaded = llmquant.load(out)
    layers = loaded.model.layers
    assert (layers[0].self_attn.q_proj.bits, layers[0].self_attn.q_proj.group_size) == (8, 32)
    assert (layers[1].mlp.down_proj.bits, layers[1].mlp.down_proj.group_size) == (3, -1)
    assert (layers[0].mlp.up_proj.bits, layers[0].mlp.up_proj.group_size) == (4, 64)
    ids = torch.tensor([[1, 2, 3, 4]])
    with ops.use_backend("reference"):  # the checkpoint's exact numerics; the CPU fast path: test_cpu_fast.py
        assert torch.allclose(loaded(ids).logits, qmodel.model(ids).logits, atol=1e-3)
    with pytest.raises(ConfigError, match="gptq"):
        QuantConfig(method="nf4", layer_overrides=overrides)
    with pytest.raises(ConfigError, match="bits must be"):
        QuantConfig(method="gptq", layer_overrides={"x": {"bits": 9}})


def test_cli_sensitivity_with_gptq_records_its_rounding_and_hessian_windows(tmp_path, capsys):
    from llmquant.cli import main

    out = tmp_path / "table.json"
    assert main(["sensitivity", "smollm2-135m", "--method", "gptq", "--act-order", "--bits", "4", "--group-sizes", "128",
                 "--nsamples", "1", "--seqlen", "32", "--statistics-nsamples", "2", "--statistics-seqlen", "64",
                 "--out", str(out)]) == 0
    table = SensitivityTable.load(out)
    assert table.method == "gptq" and len(table.rows) == 30 * 4
    assert table.calibration["statistics"] == {"corpus": "wiki", "split": "train", "nsamples": 2, "seqlen": 64, "seed": 1}
    assert all(r["kl"] >= 0 and (r["bits"], r["group_size"]) == (4, 128) for r in table.rows)
    assert main(["sensitivity", "smollm2-135m", "--bits", "4", "--out", str(out)]) == 2  # exists, no --overwrite
    with pytest.raises(SystemExit):
        main(["sensitivity", "smollm2-135m", "--method", "awq", "--out", str(tmp_path / "other.json")])
    assert "invalid choice: 'awq'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_mixed_precision_beats_uniform_at_the_same_bits_on_smollm2(tmp_path):
    """GPTQ sensitivity (3/4/8 bits x group 64/128, 2 x 256 wiki train tokens apart from the GPTQ
    calibration), then GPTQ: uniform w4g128 vs the knapsack's allocation at exactly the uniform
    run's bits per weight, perplexity on the first 16 windows of the wiki test split."""
    from dataclasses import replace

    from llmquant.api import evaluate
    from llmquant.quantization.sensitivity import sensitivity_of

    calib = Calibration("wiki", 8, 512)
    uniform_config = QuantConfig(method="gptq", bits=4, group_size=128, sym=False)
    table = sensitivity_of("smollm2-135m", Calibration("wiki", 2, 256, seed=1), bits=(3, 4, 8), group_sizes=(64, 128),
                           sym=False, progress=False, config=uniform_config, statistics_calib=calib)
    uniform, uniform_report = quantize_to_disk("smollm2-135m", uniform_config, calib, tmp_path / "uniform",
                                               progress=False, plots=False)
    allocation = allocate(table, uniform_report["bits_per_weight"])
    overrides = {n: {"bits": b, "group_size": g} for n, (b, g) in allocation.choices.items()}
    mixed, mixed_report = quantize_to_disk("smollm2-135m", replace(uniform_config, layer_overrides=overrides), calib,
                                           tmp_path / "mixed", progress=False, plots=False)
    assert mixed_report["bits_per_weight"] <= uniform_report["bits_per_weight"]
    assert mixed_report["bits_per_weight"] == pytest.approx(allocation.bits_per_weight)
    assert len({b for b, _ in allocation.choices.values()}) > 1  # it did mix
    ppl = {name: evaluate(str(path), max_windows=16, progress=False)["perplexity"]
           for name, path in (("uniform", uniform), ("mixed", mixed))}
    print(ppl, allocation.bits_per_weight, uniform_report["bits_per_weight"])
    assert ppl["mixed"] < ppl["uniform"], ppl


def test_cli_target_bpw_writes_the_allocation_into_checkpoint_and_report(tmp_path, tiny_folder, capsys):
    from llmquant.arch import arch_for
    from llmquant.cli import main

    model = llmquant.load(tiny_folder)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    table = measure_sensitivity(model, arch_for(model.config), windows, bits=(2, 4, 8), group_sizes=(32,),
                                sym=False, progress=False)
    table.save(tmp_path / "table.json")
    out = tmp_path / "mixed"
    assert main(["quantize", str(tiny_folder), "--method", "rtn", "--asym", "--target-bpw", "4.5",
                 "--sensitivity", str(tmp_path / "table.json"), "--out", str(out)]) == 0
    assert "mixed precision for 4.5 bits per weight" in capsys.readouterr().out
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["bits_per_weight"] <= 4.5 and report["mixed_precision"]["allocated_bits_per_weight"] == pytest.approx(
        report["bits_per_weight"])
    assert len({(l["bits"], l["group_size"]) for l in report["layers"]}) > 1
    assert "predicted rise" in (out / "report.md").read_text()
    loaded = llmquant.load(out)
    for layer in report["layers"]:
        module = loaded.get_submodule(layer["name"])
        assert (module.bits, module.group_size) == (layer["bits"], layer["group_size"])
    assert main(["quantize", str(tiny_folder), "--method", "rtn", "--sym", "--target-bpw", "4.5",
                 "--sensitivity", str(tmp_path / "table.json"), "--out", str(tmp_path / "x")]) == 2
    assert "asymmetric grid" in capsys.readouterr().err
