"""Mixture-of-experts families (Qwen3-MoE, Mixtral, Qwen2-MoE, DeepSeek-V3) on tiny random-init models
built from transformers' own config classes: the per-expert split computes what transformers' fused
experts compute, every algorithm quantizes each expert and the checkpoint loads back to the
fake-quantized logits, routers stay in full precision, calibration coverage is counted per expert,
and the streamed run stores what the in-memory run stores."""
import json

import pytest
import torch
from safetensors import safe_open

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.arch import arch_for
from llmquant.arch.moe import ExpertList, unfuse_experts
from llmquant.inference.nn import GPTQLinear, W8A8Linear

from conftest import MOE_KINDS, tiny_config, tiny_model
from test_awq import fold_searched_or_random_scales

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def checkpoint_keys(folder):
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_split_experts_compute_what_the_fused_experts_compute(kind):
    model = tiny_model(kind)
    with torch.no_grad():
        fused = model(IDS).logits
        arch = arch_for(model.config)
        assert unfuse_experts(model, arch) >= 1
        split = model(IDS).logits
        unfuse_experts(model, arch, calibrate_all_experts=True)
        every_token = model(IDS).logits
    # equal up to the summation order of the matmuls (which the thread count changes)
    assert torch.allclose(split, fused, rtol=1e-5, atol=1e-6)
    # every token through every expert changes what the linears see, not what the block returns
    assert torch.allclose(every_token, fused, atol=1e-6)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_folded_scales_reach_every_reader_of_the_normed_input(kind):
    """AWQ / SmoothQuant fold scales into the post-attention norm: the router (and Qwen2-MoE's shared
    expert gate) read that input too, so they must take the scales, else routing would change."""
    model = tiny_model(kind)
    unfuse_experts(model, arch_for(model.config))
    with torch.no_grad():
        before = model(IDS).logits
    folded = fold_searched_or_random_scales(model, IDS, random_scales=True)
    with torch.no_grad():
        after = model(IDS).logits
    assert folded >= 4
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()


@pytest.mark.parametrize("kind,method", [("qwen3_moe", "gptq"), ("mixtral", "awq"), ("qwen2_moe", "rtn"),
                                         ("deepseek_v3", "gptq"), ("qwen2_moe", "awq+gptq")])
def test_moe_checkpoint_loads_back_to_the_fake_quantized_logits(kind, method, tmp_path):
    model = tiny_model(kind)
    router = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")}
    qmodel = llmquant.quantize(model, QuantConfig(method=method, bits=4, group_size=32, dtype="float32"),
                               calib=CALIB, progress=False)
    with torch.no_grad():
        fake = qmodel.model(IDS).logits
    folder = qmodel.save(tmp_path / "ckpt")
    loaded = llmquant.load(folder, device="cpu")
    with torch.no_grad(), ops.use_backend("reference"):  # exact numerics; the CPU fast path: test_cpu_fast.py
        assert torch.allclose(loaded(IDS).logits, fake, atol=1e-5)

    arch = arch_for(model.config)
    experts = [m for m in loaded.modules() if isinstance(m, ExpertList)]
    assert experts and all(isinstance(getattr(e, arch.experts.gate), GPTQLinear) for m in experts for e in m)
    keys = checkpoint_keys(folder)
    stored = "block_sparse_moe" if kind == "mixtral" else "mlp"
    assert f"model.layers.1.{stored}.experts.3.{arch.experts.down}.qweight" in keys
    assert not any("gate_up_proj" in key for key in keys)  # stored per expert, as transformers saves them
    # routers keep their float weights (AWQ rescales them with the norm they read, no rounding)
    for name, weight in router.items():
        key = arch.stored_name(name)
        assert key in keys and not any(k.startswith(key[: -len("weight")] + "q") for k in keys)
        if method == "rtn":
            assert torch.equal(loaded.get_parameter(name).float(), weight)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    if kind == "qwen2_moe":  # the shared expert's one-wide gate stays float, and the config says so
        assert "model.layers.1.mlp.shared_expert_gate" in config["modules_to_not_convert"]
        assert "model.layers.1.mlp.shared_expert_gate.weight" in keys


def test_w8a8_moe_stores_int8_experts_in_compressed_tensors(tmp_path):
    model = tiny_model("qwen2_moe")
    qmodel = llmquant.quantize(model, QuantConfig(method="w8a8", dtype="float32"), progress=False)
    folder = qmodel.save(tmp_path / "ckpt")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.experts.2.up_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.experts.2.up_proj.weight_scale").shape == (32, 1)
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.shared_expert_gate" in config["ignore"]
    loaded = llmquant.load(folder, device="cpu")
    assert isinstance(loaded.model.layers[0].mlp.experts[2].up_proj, W8A8Linear)
    with torch.no_grad():
        fake, got = qmodel.model(IDS).logits, loaded(IDS).logits
    # the loaded layers also round activations to int8 per token
    assert (got - fake).abs().max() < 0.02 * fake.abs().max()


def test_every_expert_sees_every_token_when_asked(tmp_path):
    tokens = CALIB.numel()
    counts = {}
    for every in (False, True):
        qmodel = llmquant.quantize(tiny_model("mixtral"), QuantConfig(method="gptq", group_size=32,
                                                                      moe_calibrate_all_experts=every),
                                   calib=CALIB, progress=False)
        counts[every] = qmodel.report()["expert_tokens"]
        assert not any(m.calibrate_all_experts for m in qmodel.model.modules() if isinstance(m, ExpertList))
    for block, routed in counts[False].items():
        assert sum(routed.values()) == 2 * tokens  # top-2 routing: each token reaches two experts
        assert min(routed.values()) < tokens
        assert counts[True][block] == {e: tokens for e in routed}
    assert set(counts[True]) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}


def test_an_expert_no_token_reaches_is_rounded_to_nearest():
    model = tiny_model("qwen3_moe")
    gate = model.model.layers[1].mlp.gate
    routed = gate.forward

    def only_experts_0_and_1(hidden_states):
        logits, weights, indices = routed(hidden_states)
        return logits, torch.full_like(weights, 0.5), torch.tensor([0, 1]).expand_as(indices)

    gate.forward = only_experts_0_and_1
    gptq = llmquant.quantize(model, QuantConfig(method="gptq", group_size=32), calib=CALIB, progress=False)
    rtn = llmquant.quantize(tiny_model("qwen3_moe"), QuantConfig(method="rtn", group_size=32), progress=False)
    assert gptq.report()["expert_tokens"]["model.layers.1.mlp.experts"] == {"0": 32, "1": 32, "2": 0, "3": 0}
    for name in ("model.layers.1.mlp.experts.3.gate_proj", "model.layers.1.mlp.experts.3.down_proj"):
        assert torch.equal(gptq.packed[name]["qweight"], rtn.packed[name]["qweight"])
    assert not torch.equal(gptq.packed["model.layers.1.mlp.experts.0.down_proj"]["qweight"],
                           rtn.packed["model.layers.1.mlp.experts.0.down_proj"]["qweight"])


def test_streamed_mixtral_equals_the_in_memory_run(tmp_path, smollm2):
    """A Mixtral folder as transformers saves it (block_sparse_moe keys, one tensor per expert
    projection) streams block by block into the same checkpoint the in-memory run writes."""
    folder = tmp_path / "mixtral"
    tiny_model("mixtral").save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    assert any(".block_sparse_moe.experts.0.w1." in key for key in checkpoint_keys(folder))
    config = QuantConfig(method="gptq", group_size=32, dtype="float32")
    streamed = llmquant.quantize(str(folder), config, calib=CALIB, progress=False).save(tmp_path / "streamed")
    in_memory = llmquant.quantize(tiny_model("mixtral"), config, calib=CALIB, progress=False).save(tmp_path / "mem")
    streamed_loaded, memory_loaded = llmquant.load(streamed, device="cpu"), llmquant.load(in_memory, device="cpu")
    with torch.no_grad():
        assert torch.equal(streamed_loaded(IDS).logits, memory_loaded(IDS).logits)
    assert checkpoint_keys(streamed) == checkpoint_keys(in_memory)


def test_cli_calibrates_every_expert_on_every_token(tmp_path, smollm2):
    from transformers import AutoModelForCausalLM

    from llmquant.cli import main

    folder = tmp_path / "qwen3-moe"
    config = tiny_config("qwen3_moe")
    config.vocab_size = len(smollm2[1])  # real text through the tiny model
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--method", "gptq", "--group-size", "32", "--calib", "wiki", "--nsamples",
                 "2", "--seqlen", "16", "--moe-calibrate-all-experts", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["llmquant_config"]["moe_calibrate_all_experts"] is True
    assert report["expert_tokens"] == {"model.layers.1.mlp.experts": {str(e): 32 for e in range(4)}}
