"""R4, down_proj's input rotated online (llmquant/rotation/online.py): the rotated FP model computes the
same logits (Hadamard orders that are powers of two or not, and the random orthogonal fallback), SmolLM2's
MLP too; the checkpoint records it as compressed-tensors' transform_config or llmquant's own key, loads
back with the rotation attached, runs it on both backends and compiled whole; the streamed and in-memory
paths write the same checkpoint; the report says it is on; bad settings and transforms are refused."""
import copy
import json

import pytest
import torch

import llmquant
from conftest import tiny_config
from llmquant import QuantConfig
from llmquant.arch import arch_for
from llmquant.errors import CheckpointError, ConfigError
from llmquant.inference.ops import use_backend
from llmquant.rotation.online import OWN_KEY, OnlineRotation, attach_from_checkpoint, rotate_input
from llmquant.rotation.fused import rotate_model

IDS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64]])
R4 = ("down_proj",)


def _llama(intermediate_size=128):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.intermediate_size = intermediate_size
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("intermediate,kind", [(128, "Sylvester"), (192, "12 x 16"), (98, "random orthogonal")])
def test_the_rotated_model_with_r4_computes_the_same_logits(intermediate, kind):
    model = _llama(intermediate)
    with torch.no_grad():
        before = model(IDS).logits
        rotation = rotate_model(model, arch_for(model.config, model), seed=0, online=R4)
        after = model(IDS).logits
    assert kind in rotation.description["R4 (online)"]
    assert (after - before).abs().max() < 1e-5 * before.abs().max() * 10  # float32 rounding
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():  # not the identity: without its online half the weight computes something else
        down._forward_pre_hooks.clear()
        assert (model(IDS).logits - before).abs().max() > 1e-2 * before.abs().max()


def test_smollm2s_mlp_computes_the_same_with_r4(smollm2):
    """SmolLM2-135M's first MLP (1536 = 12 x 128 inputs to down_proj), its real weights."""
    mlp = copy.deepcopy(smollm2[0].model.layers[0].mlp)
    x = torch.randn(4, 16, 576, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = mlp(x)
        rotate_input(mlp.down_proj, OnlineRotation("mlp.down_proj", 1536, seed=2))
        after = mlp(x)
    assert (after - before).abs().max() < 2e-5 * before.abs().max(), float((after - before).abs().max())
    assert not torch.equal(mlp.down_proj.weight, smollm2[0].model.layers[0].mlp.down_proj.weight)


TRANSFORM_CONFIG = {"config_groups": {"R4": {
    "type": "hadamard",
    "apply": [{"targets": ["re:.*down_proj$"], "location": "input", "inverse": False, "ignore": []},
              {"targets": ["re:.*down_proj$"], "location": "weight_input", "inverse": True, "ignore": []}],
    "randomize": False, "requires_grad": False, "head_dim": None, "precision": "torch.float32"}}}


@pytest.mark.parametrize("intermediate,fields,key", [
    (128, dict(method="w8a8"), "transform_config"),  # compressed-tensors, a Sylvester order: its schema
    (192, dict(method="w8a8"), OWN_KEY),  # 12 x 16: no compressed-tensors transform type names it
    (128, dict(method="rtn", bits=8, group_size=-1, dtype="float32"), OWN_KEY),  # gptq format
])
def test_the_checkpoint_records_r4_and_loads_back_with_it(tmp_path, intermediate, fields, key):
    model = _llama(intermediate)
    with torch.no_grad():
        fp = model(IDS).logits
    config = QuantConfig(rotate="hadamard", rotate_online=R4, **fields)
    quantized = llmquant.quantize(model, config, progress=False)
    with torch.no_grad():
        in_memory = quantized.model(IDS).logits
    path = quantized.save(tmp_path / "r4")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    if key == "transform_config":
        assert qc["transform_config"] == TRANSFORM_CONFIG and OWN_KEY not in qc
    else:
        assert "transform_config" not in qc
        assert qc[OWN_KEY] == [{"target": "mlp.down_proj", "size": intermediate, "seed": 2, "kind": "hadamard"}]
    loaded = llmquant.load(path)
    rotated = sorted(name for name, module in loaded.named_modules() if hasattr(module, "input_rotation"))
    assert rotated == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    with torch.no_grad():
        out = loaded(IDS).logits
        with use_backend("reference"):  # fp32 numerics, as the kernels compute under the interpreter
            reference = loaded(IDS).logits
        with use_backend("triton"):
            triton = loaded(IDS).logits
        for i in range(2):  # without the rotation the loaded weights compute another function
            loaded.model.layers[i].mlp.down_proj._forward_pre_hooks.clear()
        unrotated = loaded(IDS).logits
    assert (out - fp).abs().max() < 0.05 * fp.abs().max()  # 8-bit rounding
    assert (unrotated - fp).abs().max() > 3 * (out - fp).abs().max()
    torch.testing.assert_close(triton, reference, rtol=1e-4, atol=1e-4)
    if fields["method"] == "rtn":  # weight-only: the in-memory model computes what the checkpoint does
        torch.testing.assert_close(reference, in_memory, rtol=1e-4, atol=1e-4)


def test_streamed_and_in_memory_r4_write_the_same_checkpoint(tmp_path, tiny_folder):
    from llmquant.storage.checkpoint import folder_tensors_sha256
    from llmquant.quantization.streaming import quantize_to_disk

    config = QuantConfig(method="gptq", bits=8, group_size=32, rotate="hadamard", rotate_online=R4)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    streamed, report = quantize_to_disk(tiny_folder, config, calib, tmp_path / "streamed", progress=False)
    in_memory = llmquant.quantize(str(tiny_folder), config, calib, progress=False).save(tmp_path / "whole")
    assert folder_tensors_sha256(streamed) == folder_tensors_sha256(in_memory)
    assert report["rotation"]["online"] == [{"target": "mlp.down_proj", "size": 128, "seed": 2, "kind": "hadamard"}]
    for folder in (streamed, in_memory):
        assert OWN_KEY in json.loads((folder / "config.json").read_text())["quantization_config"]


def test_a_loaded_r4_checkpoint_compiles_whole_and_gives_the_eager_logits(tmp_path):
    from test_compiled_decode import GraphCounter

    path = llmquant.quantize(_llama(192), QuantConfig(method="w8a8", rotate="hadamard", rotate_online=R4),
                             progress=False).save(tmp_path / "r4")
    model = llmquant.load(path, device="cpu")
    for length in (1, 8):
        ids = IDS[:, :length]
        with torch.no_grad():
            eager = model(ids).logits
            counter = GraphCounter()
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend=counter)(ids).logits
        assert len(counter.graphs) == 1
        assert "llmquant.hadamard_transform" in counter.graphs[0].code
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_the_report_says_whether_r4_is_on(tmp_path):
    from llmquant.cli import main

    folders = {}
    for online in ((), R4):
        config = QuantConfig(method="w8a8", rotate="hadamard", rotate_online=online)
        folders[online] = llmquant.quantize(_llama(), config, progress=False).save(tmp_path / f"r4-{bool(online)}")
    for online, folder in folders.items():
        card = (folder / "README.md").read_text()  # only llmquant runs R4: no transformers snippet then
        assert ("AutoModelForCausalLM" in card, "transformers + compressed-tensors |" in card) == (not online,) * 2
        assert ("which only llmquant runs" in card) == bool(online)
        assert main(["report", str(folder), "--no-plots"]) == 0
        lines = (folder / "report.md").read_text().splitlines()
        recipe = next(line for line in lines if "online rotation (R4)" in line)
        said = "online rotation (R4) Hadamard (128 = Sylvester), online on mlp.down_proj's input;"
        assert (said in recipe, "online rotation (R4) off;" in recipe) == ((True, False) if online else (False, True))


def test_r4_settings_are_checked():
    with pytest.raises(ConfigError, match="give rotate 'hadamard' as well"):
        QuantConfig(method="w8a8", rotate_online=R4)
    with pytest.raises(ConfigError, match="rotate_online takes each of down_proj at most once"):
        QuantConfig(method="w8a8", rotate="hadamard", rotate_online=("up_proj",))
    assert QuantConfig(method="w8a8", rotate="hadamard", rotate_online="down_proj").rotate_online == R4


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update(type="random-hadamard"), "type 'random-hadamard'"),
    (lambda s: s.update(head_dim=64), "head_dim 64"),
    (lambda s: s["apply"][0].update(location="output"), "location 'output'"),
])
def test_online_transforms_llmquant_does_not_run_are_refused_by_name(change, message):
    transform = copy.deepcopy(TRANSFORM_CONFIG)
    change(transform["config_groups"]["R4"])
    with pytest.raises(CheckpointError, match=message):
        attach_from_checkpoint(_llama(), {"transform_config": transform})


def test_a_sylvester_transform_of_an_order_that_is_no_power_of_two_is_refused():
    with pytest.raises(CheckpointError, match="needs a power-of-two order .* it takes 192 inputs"):
        attach_from_checkpoint(_llama(192), {"transform_config": TRANSFORM_CONFIG})


def test_a_checkpoint_holding_its_transforms_matrices_as_compressed_tensors_saves_them_loads(tmp_path):
    """compressed-tensors saves an online transform as a module of its linear: `<down_proj>.R4_input.weight`
    (the +-1 matrix). llmquant builds the matrix from the transform's type and leaves those tensors out."""
    from safetensors.torch import load_file, save_file

    from llmquant.rotation.hadamard import hadamard

    path = llmquant.quantize(_llama(), QuantConfig(method="w8a8", rotate="hadamard", rotate_online=R4),
                             progress=False).save(tmp_path / "r4")
    with torch.no_grad():
        expected = llmquant.load(path)(IDS).logits
    (shard,) = path.glob("*.safetensors")
    tensors = load_file(shard)
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.down_proj.R4_input.weight"] = hadamard(128).to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(llmquant.load(path)(IDS).logits, expected)
    qc = json.loads((path / "config.json").read_text())
    del qc["quantization_config"]["transform_config"]  # without the transform, those tensors have no place
    (path / "config.json").write_text(json.dumps(qc))
    with pytest.raises(CheckpointError, match="tensors the model has no place for: .*R4_input.weight"):
        llmquant.load(path)


def test_the_cli_passes_rotate_online_through(tmp_path, tiny_folder, capsys):
    from llmquant.cli import main

    out = tmp_path / "cli-r4"
    assert main(["quantize", str(tiny_folder), "--method", "w8a8", "--rotate", "hadamard", "--rotate-online",
                 "down_proj", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"] == TRANSFORM_CONFIG
    assert main(["quantize", str(tiny_folder), "--method", "w8a8", "--rotate-online", "down_proj",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "give rotate 'hadamard' as well" in capsys.readouterr().err


def test_smoothing_leaves_out_the_pair_whose_linear_rotates_its_input():
    """SmoothQuant's up_proj -> down_proj scales would be folded before H and compensated after it: with
    R4 that pair is left out (the attention and norm pairs stay), and the smoothed model stays as close
    to FP as without R4 (with the pair it was 2.8x further off)."""
    from llmquant.algorithms.scaling import scaling_groups

    model = _llama()
    arch = arch_for(model.config, model)
    rotate_model(model, arch, seed=0, online=R4)
    block = model.model.layers[0]
    quantized = {f"model.layers.0.{name}" for name in arch.block_linear_names(block)}
    previous = {group.name.rpartition("layers.0.")[2] for group in scaling_groups(block, arch, "model.layers.0",
                                                                                    quantized)}
    assert "mlp.up_proj" not in previous and {"input_layernorm", "post_attention_layernorm"} <= previous
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    errors = {}
    for online in ((), R4):
        model = _llama()
        with torch.no_grad():
            fp = model(IDS).logits
        quantized = llmquant.quantize(model, QuantConfig(method="smoothquant", rotate="hadamard", rotate_online=online),
                                      calib=calib, progress=False)
        with torch.no_grad():
            errors[online] = float((quantized.model(IDS).logits - fp).abs().max() / fp.abs().max())
    assert errors[R4] < 1.5 * errors[()], errors
