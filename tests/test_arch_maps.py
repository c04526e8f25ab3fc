"""Maps beyond llama: declared Phi-3 (fused qkv / gate_up) and Gemma-2 maps, maps derived from the
module tree for families without one, the refusals that name what does not fit, and `llmquant models`."""
import contextlib

import pytest
import torch
from torch import nn

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.arch import arch_for
from llmquant.arch.derived import check_model_by_forward, derive_arch
from llmquant.quantization.planning import largest_block_bytes
from llmquant.cli import main
from llmquant.errors import UnsupportedArchitectureError
from llmquant.inference.nn import GPTQLinear

from conftest import tiny_config, tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def olmo2(seed=0):
    from transformers import AutoModelForCausalLM, Olmo2Config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(Olmo2Config(**{k: v for k, v in tiny_config("llama").to_dict().items()
                                                           if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                    "num_hidden_layers", "num_attention_heads",
                                                                    "num_key_value_heads", "max_position_embeddings")},
                                                        pad_token_id=0, bos_token_id=None, eos_token_id=None)).eval()


def assert_round_trip(model, config, tmp_path, linears_per_block):
    qmodel = llmquant.quantize(model, config, calib=CALIB, progress=False)
    with torch.no_grad():
        fake = qmodel.model(IDS).logits
    loaded = llmquant.load(qmodel.save(tmp_path / "ckpt"), device="cpu")
    with torch.no_grad(), ops.use_backend("reference"):  # exact numerics; the CPU fast path: test_cpu_fast.py
        assert torch.allclose(loaded(IDS).logits, fake, atol=1e-5)
    assert sum(isinstance(m, GPTQLinear) for m in loaded.modules()) == 2 * linears_per_block
    return qmodel


@pytest.mark.parametrize("kind,method", [("phi3", "awq"), ("gemma2", "awq"), ("phi3", "gptq")])
def test_declared_phi3_and_gemma2_maps_quantize_and_load_back(kind, method, tmp_path):
    qmodel = assert_round_trip(tiny_model(kind), QuantConfig(method=method, group_size=32, dtype="float32"), tmp_path,
                               linears_per_block=4 if kind == "phi3" else 7)
    if method == "awq":  # the norms' scaling pairs are found in these layouts
        assert {r["previous"].split(".")[-1] for r in qmodel.pipeline.scaling} >= {"input_layernorm"}


def test_a_derived_map_quantizes_a_family_without_a_declared_one(tmp_path, smollm2):
    model = olmo2()
    arch = arch_for(model.config, model)
    assert arch.derived and arch.blocks == "model.layers"
    assert arch.sequential == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    config = QuantConfig(method="gptq", group_size=32, dtype="float32")
    assert_round_trip(model, config, tmp_path, linears_per_block=7)
    # streamed from a folder: the skeleton has no weights, so the map comes from names alone
    folder = tmp_path / "olmo2"
    olmo2().save_pretrained(folder)
    smollm2[1].save_pretrained(folder)
    streamed = llmquant.quantize(str(folder), config, calib=CALIB, progress=False).save(tmp_path / "streamed")
    in_memory = llmquant.load(tmp_path / "ckpt", device="cpu")
    with torch.no_grad():
        assert torch.equal(llmquant.load(streamed, device="cpu")(IDS).logits, in_memory(IDS).logits)


def test_a_derived_map_refuses_methods_that_fold_scales():
    with pytest.raises(UnsupportedArchitectureError, match="awq folds scales.*derived"):
        llmquant.quantize(olmo2(), QuantConfig(method="awq", group_size=32), calib=CALIB, progress=False)


def test_derivation_names_what_does_not_fit():
    model = tiny_model("llama")
    for block in model.model.layers:
        block.mlp.router_bias = nn.Linear(64, 4)
    model.config.model_type = "llama-variant"
    with pytest.raises(UnsupportedArchitectureError, match=r"llama-variant.*mlp\.router_bias"):
        derive_arch(model)

    model = tiny_model("llama")
    model.model.extra_layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])
    with pytest.raises(UnsupportedArchitectureError, match="one list of 2 identical decoder blocks.*model.layers, "
                                                           "model.extra_layers"):
        derive_arch(model)

    # names that put q/k/v in one step, but the forward pass shows they read different tensors
    model = tiny_model("llama")
    with k_proj_reading_another_tensor(model), pytest.raises(UnsupportedArchitectureError,
                                                             match="q_proj, self_attn.k_proj.*read different tensors"):
        check_model_by_forward(model, derive_arch(model))


@contextlib.contextmanager
def k_proj_reading_another_tensor(model):
    """The model's attention class, while the block runs, also feeds k_proj a tensor of its own."""
    attention = type(model.model.layers[0].self_attn)
    original = attention.forward

    def forward(self, hidden_states, **kwargs):
        self.k_proj(hidden_states * 2)
        return original(self, hidden_states, **kwargs)

    attention.forward = forward
    try:
        yield
    finally:
        attention.forward = original


@pytest.mark.parametrize("source", ["in memory", "streamed"])
def test_the_pipeline_checks_a_derived_map_by_a_forward_pass_whatever_holds_the_model(source, tmp_path, smollm2):
    # names that put q/k/v in one step, but the first block's forward shows they read different tensors
    model = olmo2()
    if source == "streamed":
        model.save_pretrained(tmp_path / "olmo2")
        smollm2[1].save_pretrained(tmp_path / "olmo2")
    with k_proj_reading_another_tensor(model), pytest.raises(UnsupportedArchitectureError,
                                                             match="q_proj, self_attn.k_proj.*read different tensors"):
        llmquant.quantize(model if source == "in memory" else str(tmp_path / "olmo2"),
                          QuantConfig(method="gptq", group_size=32, dtype="float32"), calib=CALIB,
                          out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_placement_is_sized_by_the_largest_block_not_the_first():
    # a mixture-of-experts model's first blocks may be dense and small
    model = tiny_model("llama")
    arch = arch_for(model.config, model)
    first = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    model.model.layers[1].mlp.extra = nn.Linear(64, 512)
    assert largest_block_bytes(model, arch) == first + (64 * 512 + 512) * 4


def test_models_lists_declared_and_derived_families(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    declared = out[out.index("declared maps"):out.index("derived from")]
    for name in ("qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3", "phi3", "gemma2", "llama"):
        assert name in declared
    assert "mixture-of-experts" in declared
    derived = out[out.index("derived from"):]
    assert "olmo2        derived: model.layers [q_proj, k_proj, v_proj | o_proj | gate_proj, up_proj | down_proj]" in derived
    assert "gpt_neox     derived: gpt_neox.layers" in derived
    assert "gpt2         refused: its decoder blocks (transformer.h) hold no nn.Linear" in derived
