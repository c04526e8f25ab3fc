"""FP8: the e4m3 grid (per channel, per block), the ops' emulation and their device implementations
(under the interpreter here), and compressed-tensors float-quantized checkpoints that load back to
the fake-quantized logits through llmquant. transformers reading the same checkpoints is an interop
test (tests/interop/test_transformers_compressed_tensors.py: it needs the compressed-tensors package)."""
import json

import pytest
import torch
from safetensors import safe_open

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.errors import ConfigError
from llmquant.grid.fp8 import FP8_DTYPE, FP8_MAX, Fp8Grid, expand_blocks, quantize_rows_fp8
from llmquant.inference.nn import Fp8Linear

from conftest import tiny_model

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def test_fp8_grid_per_channel_and_per_block():
    torch.manual_seed(0)
    w = torch.randn(80, 96) * torch.logspace(-5, 1, 96)  # columns of very different ranges
    channel = Fp8Grid().quantize(w)
    assert channel.codes.dtype == FP8_DTYPE and channel.scale.shape == (80, 1)
    assert torch.equal(channel.codes.float().abs().amax(dim=1), torch.full((80,), FP8_MAX))
    block = Fp8Grid(block=32).quantize(w)
    assert block.scale.shape == (3, 3)  # 80 rows and 96 columns: the last row of blocks is partial
    assert block.codes.float().abs().max() == FP8_MAX
    for q, scales in ((channel, channel.scale.expand(80, 96)), (block, expand_blocks(block.scale, (80, 96), 32))):
        # e4m3 keeps 3 mantissa bits: half a step is 2^-4 of a normal value, 2^-10 of the scale below 2^-6
        error = (q.dequantize() - w).abs()
        assert bool((error <= torch.maximum(w.abs() * 2**-4, scales * 2**-10) * (1 + 1e-6)).all())
    # below 2^-10 of its scale e4m3 has no value but 0: row scales flush the tiniest columns, block scales keep them
    assert (channel.codes[:, :4].float() == 0).float().mean() > 0.9
    assert (block.codes[:, :4].float() != 0).float().mean() > 0.9


def test_fp8_emulation_is_exact_e4m3_products_with_fp32_scales():
    torch.manual_seed(0)
    x, w = torch.randn(5, 64), torch.randn(48, 64)
    q = Fp8Grid(dynamic_activations=True).quantize(w)
    with ops.use_backend("reference"):
        got = ops.fp8_linear(x, q.codes, q.scale, None)
    codes, x_scale = quantize_rows_fp8(x)
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((5,), FP8_MAX))
    expected = (codes.double() @ q.codes.double().t()) * x_scale.double() * q.scale.double().t()
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 33])
def test_fp8_device_implementations_match_the_emulation(m):
    torch.manual_seed(m)
    x, w, bias = torch.randn(m, 96), torch.randn(80, 96), torch.randn(80)
    channel, block = Fp8Grid(dynamic_activations=True).quantize(w), Fp8Grid(block=32).quantize(w)
    calls = {"fp8_linear": lambda: ops.fp8_linear(x, channel.codes, channel.scale, bias),
             "fp8_block_linear": lambda: ops.fp8_block_linear(x, block.codes, block.scale, bias, 32)}
    for name, call in calls.items():
        with ops.use_backend("reference"):
            expected = call()
        with ops.use_backend("triton"):  # the Triton kernel under the interpreter, torch._scaled_mm
            got = call()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), name
    assert torch.allclose(calls["fp8_block_linear"](), x @ block.dequantize().t() + bias, atol=1e-5)


@pytest.mark.parametrize("kind,method", [("llama", "fp8"), ("llama", "fp8-block"), ("qwen3_moe", "fp8"),
                                         ("mixtral", "fp8-block")])
def test_fp8_checkpoint_loads_back_to_the_fake_quantized_logits(kind, method, tmp_path):
    config = QuantConfig(method=method, group_size=32 if method == "fp8-block" else None, dtype="float32")
    qmodel = llmquant.quantize(tiny_model(kind), config, progress=False)
    with torch.no_grad():
        fake = qmodel.model(IDS).logits
    folder = qmodel.save(tmp_path / "ckpt")
    loaded = llmquant.load(folder, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name in qmodel.packed:  # each layer computes the fake-quantized matmul
            reference, layer = qmodel.model.get_submodule(name), loaded.get_submodule(name)
            x = torch.randn(3, layer.in_features)
            if method == "fp8":  # W8A8-FP8 also rounds the layer's input, per token
                codes, scale = quantize_rows_fp8(x)
                assert torch.allclose(layer(x), reference(codes.float() * scale), atol=1e-5), name
            else:
                assert torch.allclose(layer(x), reference(x), atol=1e-6), name
        got = loaded(IDS).logits
    if method == "fp8-block":
        assert torch.allclose(got, fake, atol=1e-5)
    else:  # the in-memory model leaves activations unrounded
        assert 0 < (got - fake).abs().max() < 0.05 * fake.abs().max()
    assert sum(isinstance(m, Fp8Linear) for m in loaded.modules()) == len(qmodel.packed)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["type"] == "float" and weights["strategy"] == ("block" if method == "fp8-block" else "channel")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        name = next(iter(qmodel.packed))
        assert f.get_tensor(f"{name}.weight").dtype == FP8_DTYPE


def test_fp8_configs_are_checked():
    with pytest.raises(ConfigError, match="per output channel"):
        QuantConfig(method="fp8", group_size=32)
    with pytest.raises(ConfigError, match="multiple of 16"):
        QuantConfig(method="fp8-block", group_size=40)
    with pytest.raises(ConfigError, match="compressed-tensors-fp8"):
        QuantConfig(method="fp8", format="gptq")
    with pytest.raises(ConfigError, match="compressed-tensors-fp8"):
        QuantConfig(method="gptq", format="compressed-tensors-fp8")
    assert QuantConfig(method="fp8-block").group_size == 128


def test_fp8_ops_are_custom_ops_that_pass_opcheck_and_compile_whole():
    torch.manual_seed(0)
    w, x, bias = torch.randn(64, 96), torch.randn(3, 96), torch.randn(64)
    channel, block = Fp8Grid(dynamic_activations=True).quantize(w), Fp8Grid(block=32).quantize(w)
    samples = {"fp8_linear": (x, channel.codes, channel.scale, bias),
               "fp8_block_linear": (x, block.codes, block.scale, None, 32)}
    assert set(samples) <= set(ops.OPS)
    for name, args in samples.items():
        op = getattr(torch.ops.llmquant, name).default
        # opcheck's schema test compares inputs before and after with arithmetic torch's CPU lacks for
        # float8 ("mul_cpu_reduced_float"); the other checks run
        torch.library.opcheck(op, args, test_utils=("test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))
        compiled = torch.compile(lambda *a, _op=op: _op(*a) * 2, backend="eager", fullgraph=True)
        assert torch.allclose(compiled(*args), 2 * ops.OPS[name].reference(*args), atol=1e-5), name
