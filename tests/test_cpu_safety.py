"""The CPU fast paths (llmquant.inference.cpu) at run time: the same tokens under torch.inference_mode(), no_grad
and autograd; one model generating in several threads at once gives each thread its own tokens; a
conversion follows its weights however they are replaced; nothing is converted for layers that will
not use it (off the CPU, a base training adapters, FP8 and pack-quantized layers); W8A8's int8pack
variant does not overflow under float16 activations."""
import logging
import sys
import threading

import numpy as np
import pytest
import torch

import llmquant
from conftest import tiny_model
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.inference.cpu import prepare_for_cpu, w8a8
from llmquant.inference.cpu.head import HalfGemvHead
from llmquant.inference.cpu.w8a8 import W8A8Kernel
from llmquant.inference.nn import W8A8Linear
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


def converted(model):
    return [name for name, m in model.named_modules() if getattr(m, "prepared", None) is not None] + \
        [name for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"), HalfGemvHead)]


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


# --- memory: nothing converted for layers that will not use it --------------------------------------

def test_a_model_placed_off_the_cpu_gets_no_cpu_conversion(gptq_folder, monkeypatch, caplog):
    """No GPU here: "meta" stands for one (what counts is that the layers are not on the CPU)."""
    from llmquant.inference import loading

    monkeypatch.setattr(loading, "resolve_device", lambda device: torch.device("meta"))
    monkeypatch.setattr(loading, "resolve_compute_dtype", lambda dtype, target: torch.float32)
    with caplog.at_level(logging.INFO, logger="llmquant.inference.cpu"):
        model = loading.load(gptq_folder, device="cuda")
    assert next(model.parameters()).is_meta
    assert converted(model) == []
    assert "14 quantized linears on meta: their own ops there, nothing converted for the CPU" in caplog.text
    assert "CPU paths" not in caplog.text


def test_a_layer_moved_off_the_cpu_lets_go_of_its_conversion(gptq_folder):
    from llmquant.inference.cpu import prepare_output_head
    from test_cpu_head import tiny_llama

    model = llmquant.load(gptq_folder, device="cpu")
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.prepared is not None
    layer.to("meta")
    assert layer(torch.empty(1, 64, device="meta")).shape == (1, 64)
    assert layer.prepared is None
    model = tiny_llama()
    gemv = prepare_output_head(model)
    assert gemv.nbytes > 0
    model.lm_head.to("meta")
    assert model.lm_head(torch.empty(1, 64, device="meta")).is_meta
    assert gemv.nbytes == 0


def converted_bytes(model) -> int:
    total = 0
    for module in model.modules():
        converted = getattr(module, "prepared", None)
        if converted is not None and converted.kernel is not None:
            total += converted.kernel.nbytes
        if isinstance(module.__dict__.get("forward"), HalfGemvHead):
            total += module.forward.nbytes
    return total


def tensor_bytes(model) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_base_training_adapters_keeps_no_cpu_conversion(tmp_path):
    from llmquant.inference.loading import load
    from llmquant.inference.nn import BnB4bitLinear
    from llmquant.training.qlora import LoraSettings, attach_lora

    model = tiny_model("llama")
    with torch.no_grad():  # float16 numbers: the head would get its float16 copy
        for p in model.parameters():
            p.copy_(p.half().float())
    qmodel = llmquant.quantize(model, QuantConfig(method="nf4", double_quant=True), progress=False)
    folder = qmodel.save(tmp_path / "nf4")
    loaded = llmquant.load(folder, device="cpu")
    packed = sum(tensor_bytes(m) for m in loaded.modules() if isinstance(m, BnB4bitLinear))
    assert converted_bytes(loaded) > 2 * packed  # for inference: float16 caches (tiny layers: absmax weighs)
    peft_model = attach_lora(loaded, LoraSettings(r=4, dropout=0.0))
    assert converted(peft_model) == [] and converted_bytes(peft_model) == 0

    # as finetune loads it: nothing converted at load, nor in training steps and evaluations after
    base = load(folder, device="cpu", cpu_paths=False)
    assert converted(base) == []
    before = tensor_bytes(base)
    peft_model = attach_lora(base, LoraSettings(r=4, dropout=0.0))
    ids = torch.randint(0, 128, (2, 9))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    peft_model.eval()
    with torch.no_grad():
        peft_model(input_ids=ids)
    with torch.inference_mode():
        peft_model(input_ids=ids[:, :1])
    adapters = sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)
    assert converted(peft_model) == []
    assert tensor_bytes(peft_model) + converted_bytes(peft_model) <= before + adapters


def test_fp8_and_pack_quantized_layers_are_reported_as_the_op_they_run(tmp_path, caplog, capsys):
    from llmquant.cli import main
    from test_pack_quantized import write_pack_quantized

    fp8 = llmquant.quantize(tiny_model("llama"), QuantConfig(method="fp8", dtype="float32"), progress=False)
    fp8_folder = fp8.save(tmp_path / "fp8")
    packed_folder = tmp_path / "packed"
    write_pack_quantized(packed_folder, 4, 32, True)
    for folder in (fp8_folder, packed_folder):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="llmquant.inference.cpu"):
            model = llmquant.load(folder, device="cpu")
        assert "CPU paths: 14 reference; 0.0 MiB converted tensors" in caplog.text
        assert converted_bytes(model) == 0 and not any(getattr(m, "prepared", None) is not None
                                                       for m in model.modules())
        layers = prepare_for_cpu(model)
        assert all(layer.path == "reference" and "its own op" in layer.detail for layer in layers)
        assert main(["info", str(folder)]) == 0
        out = capsys.readouterr().out
        assert "paths: 14 reference; 0.0 MiB converted tensors" in out and "dequantized" not in out


# --- numerics: W8A8's int8pack variant ------------------------------------------------------------

def test_w8a8_variants_do_not_overflow_under_float16_activations():
    in_features = 4096  # 16129 * 4096: far past float16's 65504
    module = W8A8Linear(in_features, 32, static=False, dtype=torch.float16)
    module.weight.fill_(127)
    module.weight[::2, ::3] = -128
    module.weight_scale.fill_(1e-4)
    x = (torch.rand(3, in_features) + 1).half()  # positive: every product adds up
    expected = reference_output(module, x)
    assert torch.isfinite(expected).all() and expected.abs().max() > 1
    for variant in (v for v in w8a8.runnable_variants() if v != "int_mm"):
        got = W8A8Kernel([module], torch.float16, variant=variant)(x)
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert relative_error(got.float(), expected.float()) < 1e-3, variant
    assert torch.equal(W8A8Kernel([module], torch.float16, variant="int_mm")(x), expected)


def test_torch_compile_runs_the_fast_paths_to_the_same_logits(gptq_model):
    """Dynamo traces the kernels and runs the bookkeeping around them as Python (graph breaks)."""
    import torch._dynamo

    ids = torch.tensor([PROMPTS[1]])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            assert torch.equal(torch.compile(gptq_model, backend="eager")(ids).logits, gptq_model(ids).logits)
    finally:
        torch._dynamo.reset()
