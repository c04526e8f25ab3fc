"""Rotations fused into the weights (llmquant/rotation/fused.py): Hadamard matrices of the orders models
use, the rotated model computing the same function (tied or not, with biases, grouped-query
attention), the streamed and in-memory paths writing the same checkpoint, and refusals."""
import json

import pytest
import torch

import llmquant
from conftest import tiny_config, tiny_model
from llmquant import QuantConfig
from llmquant.arch import arch_for
from llmquant.errors import ConfigError, UnsupportedArchitectureError
from llmquant.inference.ops import use_backend
from llmquant.rotation.fused import hadamard, rotate_model, rotation_matrix

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64]])


@pytest.mark.parametrize("n", [1, 2, 4, 12, 64, 128, 576, 640, 896, 1536, 2048, 3584, 4096, 5120])
def test_hadamard_matrices_of_the_orders_models_use(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_orders_without_a_hadamard_matrix_get_a_random_orthogonal_one_and_say_so():
    q, what = rotation_matrix(6, seed=0)  # 6 is no Hadamard order
    assert "random orthogonal" in what and torch.allclose(q @ q.T, torch.eye(6, dtype=torch.float64))
    q1, _ = rotation_matrix(576, seed=1)
    q2, _ = rotation_matrix(576, seed=1)
    assert torch.equal(q1, q2) and not torch.equal(q1, rotation_matrix(576, seed=2)[0])


def _with_scaled_norms(model):
    with torch.no_grad():  # norm weights far from 1, so that folding them matters
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)])
def test_the_rotated_model_computes_the_same_logits(kind, tied):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    if kind == "llama":
        model = tiny_model("llama")
    else:  # qwen2: biases on q / k / v; mistral: grouped-query attention as llama
        base = tiny_config("llama").to_dict()
        config = (Qwen2Config if kind == "qwen2" else MistralConfig)(**{k: base[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model = _with_scaled_norms(model)
    with torch.no_grad():
        before = model(IDS).logits
        rotate_model(model, arch_for(model.config, model), seed=0)
        after = model(IDS).logits
    assert (after - before).abs().max() < 1e-5 * before.abs().max() * 100  # float32 rounding of the products
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    norms = [p for n, p in model.named_parameters() if "norm" in n and "layernorm" in n or n.endswith("model.norm.weight")]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_streamed_and_in_memory_rotation_write_the_same_checkpoint_that_loads_untied(tmp_path, tiny_folder):
    from llmquant.storage.checkpoint import folder_tensors_sha256
    from llmquant.quantization.streaming import quantize_to_disk

    config = QuantConfig(method="rtn", bits=8, group_size=32, rotate="hadamard", rotate_seed=3)
    streamed, report = quantize_to_disk(tiny_folder, config, None, tmp_path / "streamed", progress=False)
    in_memory = llmquant.quantize(str(tiny_folder), config, None, progress=False).save(tmp_path / "whole")
    assert folder_tensors_sha256(streamed) == folder_tensors_sha256(in_memory)
    assert report["rotation"]["R1 (residual)"] == "randomized Hadamard (64)" and report["rotation"]["seed"] == 3
    assert json.loads((streamed / "config.json").read_text())["tie_word_embeddings"] is False
    fp = llmquant.load(tiny_folder)
    rotated = llmquant.load(streamed)
    with torch.no_grad():
        a, b = fp(IDS).logits, rotated(IDS).logits
    # 8-bit weights of a rotated model: the same function up to the rounding
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotation_rounds_the_same_linears_and_its_checkpoint_loads_to_the_logits_in_memory(tmp_path, method):
    """Rotation changes the weights, never which of them are rounded: the same block linears are
    quantized with and without it (the head it unties and the embeddings stay in full precision), and
    the rotated model, written and loaded back, computes the logits the quantized model computed in
    memory. (SmolLM2's worse perplexity with rotation was looked for here first: it is not a lost or
    extra tensor, see eval/RESULTS.md.)"""
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    quantized_layers, loaded_quantized, stored_keys = {}, {}, {}
    for rotate in (None, "hadamard"):
        model = _with_scaled_norms(tiny_model("llama"))
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        config = QuantConfig(method=method, bits=4, group_size=32, sym=False, dtype="float32", rotate=rotate)
        quantized = llmquant.quantize(model, config, calib=calib if method == "gptq" else None, progress=False)
        with torch.no_grad():
            in_memory = quantized.model(IDS).logits
        path = quantized.save(tmp_path / str(rotate))
        loaded = llmquant.load(path)
        with torch.no_grad(), use_backend("reference"):  # fp32 numerics, as the pipeline computed in memory
            assert torch.allclose(loaded(IDS).logits, in_memory, atol=1e-4), rotate
        quantized_layers[rotate] = [layer.name for layer in quantized.pipeline.layers]
        loaded_quantized[rotate] = {name for name, module in loaded.named_modules()
                                    if hasattr(module, "dequantized_weight")}
        stored_keys[rotate] = {key for key in quantized.checkpoint_tensors() if not key.startswith("lm_head.")}
    assert quantized_layers[None] == quantized_layers["hadamard"]
    assert loaded_quantized[None] == loaded_quantized["hadamard"] == set(quantized_layers[None])
    assert stored_keys[None] == stored_keys["hadamard"]  # the rotated checkpoint adds the untied head only


def test_rotation_lowers_the_rounding_error_of_a_model_with_outlier_channels(tmp_path):
    """Outlier input channels (a few columns 30x larger, as LLMs have): per-channel 3-bit RTN
    of the rotated model is closer to the FP logits than of the plain one."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    with torch.no_grad():
        for block in model.model.layers:
            for linear in (block.self_attn.q_proj, block.mlp.gate_proj, block.mlp.down_proj):
                linear.weight[:, :3] *= 30
    reference = model(IDS).logits.detach()
    errors = {}
    for rotate in (None, "hadamard"):
        config = QuantConfig(method="rtn", bits=3, group_size=-1, sym=False, rotate=rotate)
        path = llmquant.quantize(tiny_model_copy(model), config, progress=False).save(tmp_path / str(rotate))
        with torch.no_grad():
            errors[rotate] = float((llmquant.load(path)(IDS).logits - reference).pow(2).mean())
    assert errors["hadamard"] < errors[None], errors


def tiny_model_copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("kind", ["gemma3", "opt", "qwen3_moe"])
def test_families_whose_layers_break_the_algebra_are_refused(kind):
    with pytest.raises(UnsupportedArchitectureError, match="--rotate needs a pre-norm decoder"):
        llmquant.quantize(tiny_model(kind), QuantConfig(method="rtn", bits=4, group_size=32, rotate="hadamard"),
                          progress=False)


def test_an_unknown_rotation_is_refused():
    with pytest.raises(ConfigError, match="rotate must be one of hadamard"):
        QuantConfig(rotate="givens")


def test_the_report_sets_the_errors_without_rotation_beside_those_with_it(tmp_path):
    from llmquant.cli import main

    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    folders = {}
    for rotate in (None, "hadamard"):
        config = QuantConfig(method="gptq", bits=4, group_size=32, sym=False, rotate=rotate)
        folders[rotate] = llmquant.quantize(_with_scaled_norms(tiny_model("llama")), config, calib=calib,
                                            progress=False).save(tmp_path / f"rotate-{rotate}")
    assert main(["report", str(folders["hadamard"]), "--no-plots", "--compare", str(folders[None])]) == 0
    text = (folders["hadamard"] / "report.md").read_text()
    section = text.split("## Beside `rotate-None`")[1]
    assert "Its recipe: method gptq" in section and "rotation" not in section.split("\n\n")[1]
    rotated = json.loads((folders["hadamard"] / "quantize_report.json").read_text())["layers"]
    plain = json.loads((folders[None] / "quantize_report.json").read_text())["layers"]
    for ours, theirs in zip(rotated, plain):  # each layer's output errors and their ratio, from both reports
        row = next(line for line in section.splitlines() if line.startswith(f"| {ours['name']} |"))
        cells = [cell.strip() for cell in row.split("|")[2:5]]
        assert cells == [f"{ours['relative_output_error']:.3e}", f"{theirs['relative_output_error']:.3e}",
                         f"{ours['relative_output_error'] / theirs['relative_output_error']:.2f}"]
    assert "| down_proj |" in section and "| 1 |" in section  # by kind and by block
