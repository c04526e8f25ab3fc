"""Linears that read one input (q/k/v, gate/up) run on the CPU as one stacked matmul (llmquant.inference.cpu.fused):
the model's outputs equal those of the layers run one by one, the members share one computation per
call of their owner and nothing outlives that call, a member called on another tensor still gets its
own output, and siblings that cannot run as one are left apart."""
import gc
import weakref

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from llmquant.inference import ops
from llmquant.config import QuantConfig
from llmquant.inference.cpu import fused, prepare_for_cpu, selection, summary
from llmquant.inference.cpu.fused import SharedInputGroup
from llmquant.formats import FORMATS
from llmquant.grid.codebook import CodebookGrid
from llmquant.inference.nn import W8A8Linear
from test_cpu_fast import BF16_TOLERANCE, quantized_linear, random_quantized, relative_error

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SIBLINGS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# A whole random model's logits: bf16 rounding in every linear of two blocks adds up past one layer's
# (measured: up to 0.067 for the int8 packed op over other token draws, 0.050 for the 4-bit layers' dense
# bf16 path at 27 rows; a wrong stacking or slice is off by the logits' own size)
MODEL_BF16_TOLERANCE = 8e-2


def gptq_linear(out_features, in_features, seed, bits=4, group_size=32, act_order=False):
    return quantized_linear("gptq", random_quantized(out_features, in_features, bits, group_size, False, act_order,
                                                     seed=seed), bias=False)


def w8a8_linear(out_features, in_features, seed, input_scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    module = W8A8Linear(in_features, out_features, static=input_scale is not None, dtype=torch.float32)
    module.weight.copy_(torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=gen))
    module.weight_scale.copy_(torch.rand(out_features, 1, generator=gen) * 0.01 + 1e-3)
    if input_scale is not None:
        module.input_scale.fill_(input_scale)
    return module


def nf4_linear(out_features, in_features, seed):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    config = QuantConfig(method="nf4", double_quant=True, dtype="float32")
    fmt = FORMATS["bitsandbytes"]
    tensors = fmt.pack(CodebookGrid("nf4", 64, True).quantize(weight), config)
    module = fmt.build_linear("layer", fmt.quantization_config(config), {k: tuple(v.shape) for k, v in tensors.items()},
                              False, in_features, out_features, torch.float32)
    module.load_state_dict(tensors, assign=True)
    return module


LINEAR_KINDS = {
    "gptq w4 g32": (gptq_linear, "int4pack"),
    "gptq w8 per channel": (lambda o, i, seed: gptq_linear(o, i, seed, bits=8, group_size=-1), "int8pack"),
    "w8a8 static": (w8a8_linear, "w8a8"),
    "w8a8 dynamic": (lambda o, i, seed: w8a8_linear(o, i, seed, input_scale=None), "w8a8"),
    "nf4": (nf4_linear, "dequantized"),
}


def tiny_quantized_llama(make_linear):
    """A tiny random llama whose block linears are `make_linear(out, in, seed)`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    for index, block in enumerate(model.model.layers):
        for number, name in enumerate(BLOCK_LINEARS):
            linear = block.get_submodule(name)
            block.set_submodule(name, make_linear(linear.out_features, linear.in_features, 10 * index + number))
    return model


def kernels(model):
    return {name: m.prepared.kernel for name, m in model.named_modules() if getattr(m, "prepared", None) is not None}


@pytest.mark.parametrize("kind", list(LINEAR_KINDS))
def test_stacked_siblings_equal_the_layers_run_apart(kind, monkeypatch):
    make_linear, path = LINEAR_KINDS[kind]
    model = tiny_quantized_llama(make_linear)
    # 7 rows: below every class's dense threshold for a kept weight, where each output column is computed
    # alike whatever stands beside it; 27 rows: a dense bf16 GEMM there, whose columns past the first
    # block of a stacked weight may round their bf16 outputs one step apart
    many = torch.randint(0, 128, (3, 9))  # drawn first: the ids this test has always checked against the reference
    few = many[:1, :7]
    layers = prepare_for_cpu(model)
    assert {layer.path for layer in layers} == {path}
    stacked = {layer.name.rsplit(".", 1)[-1] for layer in layers if "stacked with" in layer.detail}
    assert stacked == set(SIBLINGS)
    assert f"{len(layers)} {path}; 10 stacked;" in summary(layers)
    with torch.no_grad():
        together = [model(ids).logits for ids in (few, many)]
        with ops.use_backend("reference"):
            reference = model(many).logits
        monkeypatch.setattr(selection, "shared_input_groups", lambda model: [])
        layers = prepare_for_cpu(model)  # converted again, one kernel per layer
        assert not any("stacked" in layer.detail for layer in layers)
        apart = [model(ids).logits for ids in (few, many)]
    assert relative_error(together[0], apart[0]) < 1e-5
    assert relative_error(together[1], apart[1]) < MODEL_BF16_TOLERANCE
    assert relative_error(together[1], reference) < MODEL_BF16_TOLERANCE


class CountingKernel:
    nbytes, detail = 0, "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return torch.cat([x, 2 * x, 3 * x], dim=-1)


class Owner(nn.Module):
    """Stands for an attention module: its forward runs `script`, steps that call the members."""

    def __init__(self, kernel):
        super().__init__()
        self.group = SharedInputGroup(kernel, [4, 4, 4], self)
        fused.open_scopes_around(self)

    def forward(self, script):
        return [step(self.group) for step in script]


def member(index, x):
    return lambda group: group.output(index, x)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_members_share_one_computation_per_owner_call_and_nothing_is_kept(mode):
    kernel = CountingKernel()
    owner = Owner(kernel)
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        x = torch.randn(2, 4)
        outputs = owner([member(i, x) for i in (1, 0, 2)])  # any order
        assert kernel.calls == 1
        assert all(torch.equal(out, (i + 1) * x) for out, i in zip(outputs, (1, 0, 2)))
        assert fused._scopes.get() == ()  # the owner's call is over: no scope, nothing held
        alive = weakref.ref(x)
        del x, outputs
        gc.collect()
        assert alive() is None
        x = torch.randn(2, 4)
        owner([member(0, x), member(1, x)])  # one member never called: let go all the same
        assert kernel.calls == 2 and fused._scopes.get() == ()
        assert torch.equal(owner([member(1, x), member(1, x)])[1], 2 * x) and kernel.calls == 4  # taken twice
        other = x.clone()  # equal values, another tensor
        assert torch.equal(owner([member(1, x), member(2, other)])[1], 3 * other) and kernel.calls == 6
        assert torch.equal(owner.group.output(2, x), 3 * x) and kernel.calls == 7  # outside an owner call
    # the same tensor changed in place between two members (a version counter: not an inference tensor)
    x = torch.randn(2, 4)
    with torch.no_grad():
        _, _, second = owner([member(0, x), lambda group: x.mul_(2), member(1, x)])
    assert torch.equal(second, 2 * x) and kernel.calls == 9


def test_owner_calls_in_two_threads_at_once_each_get_their_own_outputs():
    import threading

    both_computing = threading.Barrier(2, timeout=10)

    class WaitingKernel(CountingKernel):
        def __call__(self, x):
            both_computing.wait()  # each thread's first member computes while the other's does
            return super().__call__(x)

    kernel = WaitingKernel()
    owner = Owner(kernel)
    inputs = [torch.randn(2, 4), torch.randn(3, 4)]
    results = {}

    def run(index):
        x = inputs[index]
        results[index] = owner([member(0, x), member(2, x), member(1, x)])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert kernel.calls == 2
    for index, x in enumerate(inputs):
        assert [torch.equal(out, k * x) for out, k in zip(results[index], (1, 3, 2))] == [True] * 3


def test_an_owner_call_that_raises_leaves_no_scope():
    owner = Owner(CountingKernel())

    def fail(group):
        raise RuntimeError("out of memory, say")

    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="out of memory"):
        owner([member(0, x), fail])
    assert fused._scopes.get() == ()


def test_siblings_that_cannot_run_as_one_stay_apart(caplog):
    import logging

    def make_linear(out_features, in_features, seed):  # act-order: each sibling its own column order
        if seed % 10 in (0, 1):  # q and k: act-order with different orders
            return gptq_linear(out_features, in_features, seed, act_order=True)
        return gptq_linear(out_features, in_features, seed)

    model = tiny_quantized_llama(make_linear)
    with caplog.at_level(logging.DEBUG, logger="llmquant.inference.cpu"):
        layers = prepare_for_cpu(model)
    details = {layer.name: layer.detail for layer in layers}
    assert "stacked" not in details["model.layers.0.self_attn.q_proj"]
    assert "stacked with up_proj" in details["model.layers.0.mlp.gate_proj"]
    assert "grouped differently" in caplog.text
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        fast = model(ids).logits
        with ops.use_backend("reference"):
            assert relative_error(fast, model(ids).logits) < MODEL_BF16_TOLERANCE

    scales = iter([0.05, 0.07, 0.05, 0.05, 0.05, 0.05, 0.05] * 2)  # k_proj's static scale differs
    model = tiny_quantized_llama(lambda o, i, seed: w8a8_linear(o, i, seed, input_scale=next(scales)))
    details = {layer.name: layer.detail for layer in prepare_for_cpu(model)}
    assert "stacked" not in details["model.layers.1.self_attn.q_proj"]
    assert "stacked with up_proj" in details["model.layers.1.mlp.gate_proj"]


def test_preparing_again_keeps_the_stacks_and_a_changed_member_is_converted_alone():
    model = tiny_quantized_llama(gptq_linear)
    prepare_for_cpu(model)
    before = kernels(model)
    prepare_for_cpu(model)
    after = kernels(model)
    assert all(after[name] is before[name] for name in before)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    k_before = attention.k_proj(x)
    attention.q_proj.load_state_dict({k: v * 0 if k == "scales" else v
                                      for k, v in attention.q_proj.state_dict().items()}, assign=True)
    assert torch.all(attention.q_proj(x) == 0)  # q's new weights
    assert torch.equal(attention.k_proj(x), k_before)  # k's own slice, unchanged
    with ops.use_backend("reference"):
        v_reference = attention.v_proj(x)
    assert relative_error(attention.v_proj(x), v_reference) < BF16_TOLERANCE
