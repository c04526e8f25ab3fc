"""QLoRA: LoRA adapters over a frozen NF4 base, trained on real text, saved, reloaded and merged."""
import copy

import pytest
import torch

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.errors import ConfigError
from llmquant.formats import FORMATS
from llmquant.grid.codebook import CodebookGrid
from llmquant.training.qlora import LoraSettings, TrainingSettings, attach_lora, finetune, load_adapter, merge_into_checkpoint
from test_cpu_fast import HALF_TOLERANCE, relative_error

TRAINING = TrainingSettings(steps=8, batch_size=2, seqlen=64, lr=1e-3, warmup_steps=2, eval_windows=4)


@pytest.fixture(scope="module")
def nf4_checkpoint(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    qmodel = llmquant.quantize(copy.deepcopy(model), QuantConfig(method="nf4", double_quant=True),
                               tokenizer=tokenizer, progress=False)
    return qmodel.save(tmp_path_factory.mktemp("qlora") / "nf4")


@pytest.fixture(scope="module")
def trained(nf4_checkpoint):
    return finetune(nf4_checkpoint, LoraSettings(r=8, alpha=16, dropout=0.0), TRAINING, progress=False)


def test_heldout_loss_falls_and_only_adapters_train(trained, nf4_checkpoint):
    assert trained.heldout_loss_after < trained.heldout_loss_before
    assert len(trained.train_losses) == TRAINING.steps
    trainable = {name for name, p in trained.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    # 7 linears x 30 blocks, A [r, in] and B [out, r] each
    assert len(trainable) == 2 * 7 * 30
    # the packed base is untouched by training
    base = llmquant.load(nf4_checkpoint)
    layer = trained.model.get_base_model().model.layers[5].mlp.down_proj.get_base_layer()
    assert torch.equal(layer.weight, base.model.layers[5].mlp.down_proj.weight)


def test_gradient_reaches_the_input_through_the_dequantized_weight():
    torch.manual_seed(0)
    fmt = FORMATS["bitsandbytes"]
    config = QuantConfig(method="nf4", dtype="float32")
    quantized = CodebookGrid("nf4", 64).quantize(torch.randn(48, 128))
    tensors = fmt.pack(quantized, config)
    module = fmt.build_linear("l", fmt.quantization_config(config), {k: tuple(v.shape) for k, v in tensors.items()},
                              False, 128, 48, torch.float32)
    module.load_state_dict(tensors, assign=True)
    x = torch.randn(3, 128, requires_grad=True)
    upstream = torch.randn(3, 48)
    (module(x) * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream @ quantized.dequantize(), atol=1e-5)


def test_saved_adapter_reloads_with_the_same_outputs(trained, nf4_checkpoint, tmp_path):
    path = trained.save_adapter(tmp_path / "adapter")
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert (path / "finetune_report.json").is_file()
    reloaded = load_adapter(llmquant.load(nf4_checkpoint), path)
    ids = trained.tokenizer("Rivers carry water to the sea", return_tensors="pt").input_ids
    trained.model.eval()
    with torch.no_grad():
        # the base that trained runs the reference op (it is off the CPU paths, see attach_lora), the
        # reloaded one for inference its float16 cache: compared on one op, then on their own
        with ops.use_backend("reference"):
            assert torch.allclose(reloaded(input_ids=ids).logits, trained.model(input_ids=ids).logits, atol=1e-4)
        fast = reloaded(input_ids=ids).logits
        assert relative_error(fast, trained.model(input_ids=ids).logits) < HALF_TOLERANCE
        plain = llmquant.load(nf4_checkpoint)(ids).logits
        assert not torch.allclose(fast, plain, atol=1e-3)  # the adapter does something


def test_merge_requantizes_weight_plus_update(trained, tmp_path):
    lora_layer = trained.model.get_base_model().model.layers[2].self_attn.o_proj
    base = lora_layer.get_base_layer()
    expected = CodebookGrid("nf4", 64, True).quantize(
        base.dequantized_weight() + lora_layer.get_delta_weight("default").float()).dequantize()
    out = merge_into_checkpoint(copy.deepcopy(trained.model), trained.tokenizer, tmp_path / "merged")
    merged = llmquant.load(out)
    layer = merged.model.layers[2].self_attn.o_proj
    assert type(layer).__name__ == "BnB4bitLinear"
    assert torch.equal(layer.dequantized_weight(), expected)
    ids = trained.tokenizer("The capital of France is", return_tensors="pt").input_ids
    text = trained.tokenizer.decode(merged.generate(ids, max_new_tokens=6, do_sample=False)[0])
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is") + 3


def test_settings_and_targets_are_validated(smollm2, nf4_checkpoint):
    with pytest.raises(ConfigError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ConfigError, match="steps"):
        TrainingSettings(steps=0)
    with pytest.raises(ConfigError, match="not quantized linears"):
        attach_lora(llmquant.load(nf4_checkpoint), LoraSettings(targets=("q_proj", "lm_head")))
    with pytest.raises(ConfigError, match="no such layer"):
        attach_lora(copy.deepcopy(smollm2[0]), LoraSettings())
