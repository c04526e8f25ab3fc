import json

import pytest
import torch
from torch import nn

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.arch import arch_for
from llmquant.errors import DataError, OutputExistsError, UnsupportedArchitectureError
from llmquant.inference.nn import GPTQLinear
from llmquant.quantization.pipeline import capture_block_inputs, run_block
from llmquant.algorithms.statistics import InputGram

from conftest import tiny_model


def assert_blocks_reproduce_hidden_states(model, samples, atol):
    arch = arch_for(model.config)
    with torch.no_grad():
        expected = [model(input_ids=s[None], output_hidden_states=True, use_cache=False).hidden_states for s in samples]
    inputs = capture_block_inputs(model, arch, samples)
    hidden = inputs[0].hidden_states
    for index, block in enumerate(arch.block_list(model)):
        for sample, h in enumerate(hidden):
            assert torch.allclose(h, expected[sample][index], atol=atol), f"block {index} input, sample {sample}"
        hidden = run_block(block, hidden, inputs[index].kwargs)


def test_block_by_block_equals_full_forward_smollm2(smollm2):
    model, tokenizer = smollm2
    samples = tokenizer(["The quick brown fox jumps over the lazy dog, then sleeps all afternoon."] * 2,
                        return_tensors="pt").input_ids
    samples[1] = samples[1].flip(0)
    assert_blocks_reproduce_hidden_states(model, samples, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "opt"])
def test_block_by_block_equals_full_forward_tiny(kind):
    # Gemma-3 mixes sliding-window and full attention: each block gets its own mask.
    torch.manual_seed(0)
    assert_blocks_reproduce_hidden_states(tiny_model(kind), torch.randint(0, 128, (2, 24)), atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "opt"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, -1, False), (8, 64, False)])
def test_quantize_save_load_gives_the_fake_quantized_logits(kind, bits, group_size, sym, tmp_path):
    model = tiny_model(kind)
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        fp_logits = model(ids).logits
    qmodel = llmquant.quantize(model, QuantConfig(bits=bits, group_size=group_size, sym=sym, dtype="float32"),
                               calib=torch.randint(0, 128, (2, 16)), progress=False)
    with torch.no_grad():
        fake_logits = qmodel.model(ids).logits
    qmodel.save(tmp_path / "ckpt")
    loaded = llmquant.load(tmp_path / "ckpt")
    quantized = [n for n, m in loaded.named_modules() if isinstance(m, GPTQLinear)]
    per_block = len(arch_for(model.config).linear_names())
    assert len(quantized) == 2 * per_block and all(".layers." in n for n in quantized)
    with torch.no_grad(), ops.use_backend("reference"):  # the checkpoint's exact numerics; the CPU fast path: test_cpu_fast.py
        loaded_logits = loaded(ids).logits
    assert torch.allclose(loaded_logits, fake_logits, atol=1e-5)
    assert not torch.allclose(loaded_logits, fp_logits, atol=1e-3)
    report = json.loads((tmp_path / "ckpt" / "quantize_report.json").read_text())
    errors = [layer["relative_output_error"] for layer in report["layers"]]
    assert len(errors) == 2 * per_block and all(0 < e < 1 for e in errors)


def test_excluded_layers_stay_linear_and_shards_are_indexed(tmp_path):
    model = tiny_model("llama")
    qmodel = llmquant.quantize(model, QuantConfig(bits=4, group_size=32, modules_to_not_convert=("mlp.down_proj",)),
                               progress=False)
    qmodel.save(tmp_path / "ckpt", max_shard_size="20KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
    loaded = llmquant.load(tmp_path / "ckpt")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, GPTQLinear)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        # fp16 storage of the unquantized tensors: close, not identical.
        assert torch.allclose(loaded(ids).logits, qmodel.model(ids).logits, atol=2e-2)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        llmquant.quantize(model, QuantConfig(bits=4, group_size=32), progress=False)


def test_input_gram_output_error_matches_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 40)
    w = torch.randn(24, 40)
    w_hat = w + 0.01 * torch.randn(24, 40)
    gram = InputGram(40)
    for batch in x:
        gram.add_batch(batch)
    flat = x.reshape(-1, 40)
    direct = ((flat @ w.t() - flat @ w_hat.t()) ** 2).sum() / ((flat @ w.t()) ** 2).sum()
    assert gram.rows == 150
    assert abs(gram.relative_output_error(w, w_hat) - direct.item()) < 1e-4 * direct.item()
    with pytest.raises(DataError, match="NaN or Inf"):
        gram.add_batch(torch.full((2, 40), float("nan")))


def test_layers_fed_the_same_tensor_share_their_statistics():
    from llmquant.quantization.pipeline import collect_input_statistics

    model = tiny_model("llama")
    arch = arch_for(model.config)
    inputs = capture_block_inputs(model, arch, torch.randint(0, 128, (3, 16)))
    block = arch.block_list(model)[0]
    names = arch.linear_names()
    stats = collect_input_statistics(block, {n: block.get_submodule(n) for n in names},
                                     inputs[0].hidden_states, inputs[0].kwargs)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    assert all(s.rows == 3 * 16 for s in stats.values())
    # The shared statistics are those of the normed block input, seen once per token.
    normed = torch.cat([block.input_layernorm(h) for h in inputs[0].hidden_states]).reshape(-1, 64)
    assert torch.allclose(stats["self_attn.q_proj"].gram, normed.t() @ normed, atol=1e-4)


def test_a_model_held_in_memory_is_written_to_out_when_given_and_an_existing_out_is_refused_first(tmp_path):
    config = QuantConfig(method="rtn", bits=4, group_size=32, dtype="float32")
    qmodel = llmquant.quantize(tiny_model("llama"), config, out=tmp_path / "ckpt", progress=False)
    ids = torch.arange(10)[None]
    with torch.no_grad(), ops.use_backend("reference"):
        assert torch.allclose(llmquant.load(tmp_path / "ckpt", device="cpu")(ids).logits, qmodel.model(ids).logits,
                              atol=1e-5)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OutputExistsError, match="already exists"):
        llmquant.quantize(model, config, out=tmp_path / "ckpt", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any block


@pytest.mark.parametrize("bad,error", [(dict(device="cuda:7"), "cuda"), (dict(offload_activations="sometimes"),
                                                                        "offload_activations must be one of"),
                                       (dict(calib="no-such-corpus"), "no-such-corpus")])
def test_the_held_and_the_streamed_model_refuse_a_bad_request_alike_before_reading_the_model(bad, error, tmp_path,
                                                                                             tiny_folder):
    from llmquant.errors import LlmquantError

    config = QuantConfig(method="gptq", bits=4, group_size=32)
    messages = []
    for model in (tiny_model("llama"), str(tiny_folder)):
        with pytest.raises(LlmquantError, match=error) as caught:
            llmquant.quantize(model, config, out=tmp_path / "out", progress=False, **bad)
        messages.append(str(caught.value))
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    assert messages[0] == messages[1]


def test_a_method_that_needs_data_takes_the_default_calibration_once_in_the_request():
    from llmquant.data import Calibration
    from llmquant.errors import ConfigError
    from llmquant.quantization.planning import check_request, plan_run

    config = QuantConfig(method="gptq", bits=4, group_size=32)
    assert check_request(config).calib == Calibration()
    assert check_request(QuantConfig(method="rtn", bits=4, group_size=32)).calib is None
    small = Calibration(nsamples=2, seqlen=16)
    assert check_request(config, default_calib=small).calib == small
    assert check_request(config, calib=torch.zeros(1, 4, dtype=torch.long), default_calib=small).calib is not small
    # the plan itself chooses no data: a request that skipped check_request is refused, not filled in
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="gptq needs calibration data"):
        plan_run(model, arch_for(model.config), config, None, None)
