"""The CPU fast paths (llmquant.cpu) at run time: the same tokens under torch.inference_mode(), no_grad
and autograd; one model generating in several threads at once gives each thread its own tokens; a
conversion follows its weights however they are replaced; W8A8's int8pack variant does not overflow
under float16 activations."""
import sys
import threading

import numpy as np
import pytest
import torch

import llmquant
from conftest import tiny_model
from llmquant import QuantConfig, ops
from llmquant.cpu import prepare_for_cpu
from llmquant.cpu.w8a8 import W8A8Kernel
from llmquant.nn import W8A8Linear
from test_cpu_fast import quantized_linear, random_quantized, reference_output, relative_error

PROMPTS = [[5, 17, 3], [90, 2, 44, 61, 7], [11], [100, 101, 102, 103, 104, 105, 106]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    """A tiny random llama as a 4-bit GPTQ checkpoint: q/k/v and gate/up run stacked (int4pack)."""
    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    config = QuantConfig(method="rtn", bits=4, group_size=32, dtype="float32")
    return llmquant.quantize(model, config, progress=False).save(tmp_path_factory.mktemp("safety") / "gptq")


@pytest.fixture(scope="module")
def gptq_model(gptq_folder):
    model = llmquant.load(gptq_folder, device="cpu")
    assert sum(layer.stacked for layer in prepare_for_cpu(model)) == 10
    return model


def generate(model, prompt):
    return model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()


def test_generate_gives_the_same_tokens_under_inference_mode_no_grad_and_plain(gptq_model):
    with torch.no_grad():
        expected = [generate(gptq_model, prompt) for prompt in PROMPTS]
    with torch.inference_mode():
        assert [generate(gptq_model, prompt) for prompt in PROMPTS] == expected
    assert [generate(gptq_model, prompt) for prompt in PROMPTS] == expected
    assert len({tuple(tokens) for tokens in expected}) > 1  # the prompts lead to different tokens


def test_forwards_under_autograd_and_inference_mode_agree(gptq_model):
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        fast = gptq_model(ids).logits
    with torch.inference_mode():
        assert torch.equal(gptq_model(ids).logits, fast)
    frozen = gptq_model(ids).logits  # autograd on, the embeddings' gradient wanted: the reference op
    frozen.sum().backward()
    assert gptq_model.model.embed_tokens.weight.grad is not None
    gptq_model.zero_grad(set_to_none=True)
    with ops.use_backend("reference"), torch.no_grad():
        assert relative_error(frozen.detach(), gptq_model(ids).logits) < 1e-5
    assert relative_error(frozen.detach(), fast) < 5e-2  # the packed ops compute in bfloat16


def test_threads_generating_from_one_model_get_their_own_tokens(gptq_model):
    with torch.no_grad():
        serial = [generate(gptq_model, prompt) for prompt in PROMPTS]
    barrier = threading.Barrier(len(PROMPTS))
    results, errors = {}, []

    def run(index, inference):
        try:
            barrier.wait()
            with torch.inference_mode() if inference else torch.no_grad():
                results[index] = [generate(gptq_model, PROMPTS[index]) for _ in range(3)]
        except BaseException as exc:  # reported below, with the thread's index
            errors.append((index, exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as Python allows: shared state would be torn
    try:
        threads = [threading.Thread(target=run, args=(i, i % 2 == 0)) for i in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for index, runs in results.items():
        assert runs == [serial[index]] * 3, index


# --- freshness: a conversion follows its weights however they are replaced ---------------------------

def gptq_module():
    module = quantized_linear("gptq", random_quantized(32, 128, 4, 32, False, False))
    module.scales = module.scales.clone()  # a fresh tensor: version 0, like one a checkpoint gives
    return module


def test_a_new_tensor_at_the_old_ones_address_is_converted_again():
    module = gptq_module()
    x = torch.randn(2, 128)
    with torch.no_grad():
        before = module(x)
        old = module.scales
        # A new tensor object over the same memory, its values written without a version bump: what
        # a tensor allocated where a freed one was looks like (same data_ptr, version 0).
        new = torch.from_numpy(old.numpy())
        assert new.data_ptr() == old.data_ptr() and new._version == old._version == 0
        new.numpy()[:] = (old.numpy() * 2).astype(np.float16)
        module.scales = new
        del old
        assert relative_error(module(x) - module.bias, 2 * (before - module.bias)) < 1e-2
        assert relative_error(module(x), reference_output(module, x)) < 1e-2


@pytest.mark.parametrize("how", ["assigned", "in place", ".data", "load_state_dict", "inference load_state_dict"])
def test_a_replaced_weight_is_followed(how):
    mode = torch.inference_mode() if how.startswith("inference") else torch.no_grad()
    with mode:
        module = gptq_module()  # under inference_mode: inference tensors, no version counter
        x = torch.randn(2, 128)
        before = module(x)
        doubled = module.scales * 2
        if how == "assigned":
            module.scales = doubled
        elif how == "in place":
            module.scales.mul_(2)
        elif how == ".data":
            module.scales.data = doubled
        else:
            module.load_state_dict({**module.state_dict(), "scales": doubled})  # copied into the old tensor
        after = module(x)
    assert relative_error(after - module.bias, 2 * (before - module.bias)) < 1e-2


def test_a_stacked_member_with_a_new_tensor_at_the_same_address_leaves_the_stack():
    from test_cpu_stacked import gptq_linear, tiny_quantized_llama

    model = tiny_quantized_llama(gptq_linear)
    prepare_for_cpu(model)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        q_before = attention.q_proj(x)
        old = attention.k_proj.scales
        new = torch.from_numpy(old.numpy())
        new.numpy()[:] = 0
        attention.k_proj.scales = new
        assert torch.all(attention.k_proj(x) == 0)
        assert torch.equal(attention.q_proj(x), q_before)


# --- numerics: W8A8's int8pack variant ------------------------------------------------------------

def test_w8a8_int8pack_variant_does_not_overflow_under_float16_activations():
    in_features = 4096  # 16129 * 4096: far past float16's 65504
    module = W8A8Linear(in_features, 32, static=False, dtype=torch.float16)
    module.weight.fill_(127)
    module.weight[::2, ::3] = -128
    module.weight_scale.fill_(1e-4)
    x = (torch.rand(3, in_features) + 1).half()  # positive: every product adds up
    expected = reference_output(module, x)
    assert torch.isfinite(expected).all() and expected.abs().max() > 1
    got = W8A8Kernel([module], torch.float16, use_int_mm=False)(x)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert relative_error(got.float(), expected.float()) < 1e-3
    assert torch.equal(W8A8Kernel([module], torch.float16, use_int_mm=True)(x), expected)
