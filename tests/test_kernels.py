"""The Triton kernels (llmquant_kernels) under the interpreter, each against its torch reference, over
shapes that catch mistakes: M = 1, 3, 16, 33; N and K not multiples of the tiles; group sizes 32, 64,
128 and per channel; a partial last group; act-order g_idx; symmetric and asymmetric grids; decode
shapes take the split-K path. bf16 is left to the GPU check: the interpreter computes it wrongly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.errors import ConfigError
from llmquant.formats import FORMATS
from llmquant.grid import AffineGrid
from llmquant.grid.activations import quantize_per_tensor, quantize_per_token
from llmquant.grid.codebook import CodebookGrid
from llmquant_kernels import codebook4_matmul, int8_scaled_matmul, quantize_rows_int8, w4a16_matmul
from llmquant_kernels import w4a16 as w4a16_module
from llmquant_kernels._launch import _config, gemv_block_m, interpreter_config

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


def _gptq_tensors(n, k, bits, group_size, sym, act_order, seed):
    torch.manual_seed(seed)
    weight = torch.randn(n, k)
    grid = AffineGrid(bits, sym, group_size, min_zero=0 if sym else 1)
    quantized = grid.quantize(weight)
    if act_order:  # columns visited in a permuted order: g_idx is no longer monotone
        quantized.group_index = quantized.group_index[torch.randperm(k)].contiguous()
        g = quantized.group_index.long()
        quantized.codes = grid.quantize_values(weight, quantized.scale[:, g], quantized.zero[:, g]).to(torch.uint8)
    return FORMATS["gptq"].pack(quantized, QuantConfig(bits=bits, group_size=group_size, sym=sym))


@pytest.mark.parametrize("bits,group_size,sym,act_order,m,n,k", [
    (4, 32, True, False, 1, 72, 200),
    (4, 64, False, True, 3, 72, 200),     # partial last group (200 = 3 * 64 + 8), act-order
    (4, 128, False, False, 16, 40, 200),  # partial last group of 72
    (4, -1, True, True, 33, 72, 136),
    (4, 64, True, False, 33, 72, 256),
    (3, 64, False, False, 16, 96, 224),   # 3-bit values straddle int32 words
    (3, -1, True, True, 3, 64, 160),
    (2, 32, False, True, 1, 48, 144),
    (8, 128, False, False, 33, 40, 200),
    (8, 32, True, True, 3, 36, 72),
])
def test_w4a16_gptq_layout_matches_reference(bits, group_size, sym, act_order, m, n, k):
    t = _gptq_tensors(n, k, bits, group_size, sym, act_order, seed=bits * 100 + m)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    expected = ops.OPS["gptq_linear"].reference(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits, 1)
    got = w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits=bits, layout="gptq",
                       zero_offset=1)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_w4a16_gptq_fp16_activations_and_v2_zero_offset():
    t = _gptq_tensors(40, 200, 4, 64, False, False, seed=7)
    zeros_v2 = t["qzeros"]  # read as v2 (no +1): a different, equally valid weight
    x = torch.randn(5, 200).half()
    expected = ops.OPS["gptq_linear"].reference(x.float(), t["qweight"], zeros_v2, t["scales"], t["g_idx"], None, 4, 0)
    got = w4a16_matmul(x, t["qweight"], zeros_v2, t["scales"], t["g_idx"], None, bits=4, layout="gptq",
                       zero_offset=0)
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), expected, atol=2e-2, rtol=1e-2)


# The GEMV (GPTQ layout, M <= 8): partial last groups, act-order, N not a multiple of the column
# block (N must be a multiple of 32 at 3 bits: 64-column blocks there), K not a multiple of the
# step (64- and 128-value steps leave a partial last one; at 3 bits a run of three words past the end).
@pytest.mark.parametrize("bits,group_size,sym,act_order,m,n,k,block_n,block_k", [
    (4, 64, False, True, 1, 72, 200, 32, 32),    # partial last group of 8, act-order, K % 32 = 8
    (4, 32, True, False, 8, 40, 96, 32, 64),     # 1.5 steps
    (4, -1, False, True, 2, 56, 136, 32, 32),    # per channel
    (3, 64, False, True, 5, 96, 224, 64, 64),    # 3.5 steps: the last run of three words is past K
    (3, -1, True, False, 2, 160, 160, 64, 128),
    (2, 32, False, True, 7, 48, 144, 32, 32),    # K % 32 = 16: half a step of 2-bit words
    (2, 128, True, False, 3, 80, 208, 32, 128),  # partial last group of 80
    (8, 128, False, False, 4, 36, 200, 32, 32),  # partial last group of 72, K % 32 = 8
    (8, 32, True, True, 1, 72, 76, 32, 64),      # K = 76: 19 words of 4 values
])
def test_w4a16_gemv_matches_reference(bits, group_size, sym, act_order, m, n, k, block_n, block_k):
    t = _gptq_tensors(n, k, bits, group_size, sym, act_order, seed=bits * 10 + m)
    x = torch.randn(m, k)
    bias = torch.randn(n) if m % 2 else None
    expected = ops.OPS["gptq_linear"].reference(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits, 1)
    config = _config(gemv_block_m(m), block_n, block_k, 2, num_warps=1, num_stages=1)
    got = w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits=bits, layout="gptq",
                       zero_offset=1, config=config, path="gemv")
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_w4a16_gemv_fp16_activations_and_v2_zeros():
    t = _gptq_tensors(40, 200, 4, 64, False, True, seed=5)
    x = torch.randn(3, 200).half()
    expected = ops.OPS["gptq_linear"].reference(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 4, 0)
    got = w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, bits=4, layout="gptq",
                       zero_offset=0, path="gemv")
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), expected, atol=2e-2, rtol=1e-2)


def _awq_tensors(n, k, group_size, sym, seed):
    torch.manual_seed(seed)
    quantized = AffineGrid(4, sym, group_size).quantize(torch.randn(n, k))
    return FORMATS["awq"].pack(quantized, QuantConfig(bits=4, group_size=group_size, sym=sym, format="awq"))


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_the_gemv_path_is_chosen_by_m_at_both_layouts(layout, monkeypatch):
    if layout == "gptq":
        t = _gptq_tensors(40, 192, 4, 64, False, True, seed=5)
    else:
        t = {**_awq_tensors(40, 192, 64, False, seed=5), "g_idx": None}
    chosen = []
    run_tiled = w4a16_module.run_tiled
    monkeypatch.setattr(w4a16_module, "run_tiled", lambda spec, *a, **kw: chosen.append(spec.name) or run_tiled(spec, *a, **kw))
    args = (t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None)
    layout_args = {"bits": 4, "layout": layout, "zero_offset": 1 if layout == "gptq" else 0, "group_size": 64}
    for m in (1, 8, 9):
        w4a16_matmul(torch.randn(m, 192), *args, **layout_args)
    w4a16_matmul(torch.randn(4, 192), *args, **layout_args, path="tiled")
    assert chosen == ["w4a16_gemv", "w4a16_gemv", "w4a16", "w4a16"]
    with pytest.raises(ValueError, match=r"the GEMV path takes M <= 8 rows, not M = 9"):
        w4a16_matmul(torch.randn(9, 192), *args, **layout_args, path="gemv")


@pytest.mark.parametrize("group_size,sym,m,n,k", [
    (32, False, 1, 72, 96), (64, True, 3, 40, 192), (128, False, 16, 72, 256), (64, False, 33, 56, 128)])
def test_w4a16_awq_layout_matches_reference(group_size, sym, m, n, k):
    t = _awq_tensors(n, k, group_size, sym, seed=group_size + m)
    x = torch.randn(m, k)
    bias = torch.randn(n) if sym else None
    expected = ops.OPS["awq_linear"].reference(x, t["qweight"], t["qzeros"], t["scales"], bias, group_size)
    got = w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], None, bias, bits=4, layout="awq", zero_offset=0,
                       group_size=group_size)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


# The GEMV at the AWQ layout (N a multiple of 8 and K of the group size, which the format requires):
# N not a multiple of the column block, K not a multiple of the step, per channel, a group size that
# is not a multiple of a run of 8 rows (runs that straddle two groups), fp16 activations.
@pytest.mark.parametrize("group_size,sym,m,n,k,block_n,block_k,dtype", [
    (32, False, 1, 72, 96, 32, 32, torch.float32),     # N = 2 blocks + 8 columns; 3 steps over 2 splits
    (64, True, 3, 40, 192, 32, 64, torch.float32),
    (128, False, 8, 56, 256, 32, 128, torch.float32),
    (-1, True, 8, 72, 136, 32, 32, torch.float32),     # per channel; K % 32 = 8: a partial last step
    (20, False, 3, 48, 200, 32, 64, torch.float32),    # runs straddle groups; K = 3 steps + 8 rows
    (40, True, 1, 40, 120, 64, 64, torch.float16),
])
def test_w4a16_awq_gemv_matches_reference_and_the_tiled_kernel(group_size, sym, m, n, k, block_n, block_k, dtype):
    t = _awq_tensors(n, k, group_size, sym, seed=group_size + m + n)
    group_size = k if group_size == -1 else group_size
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    expected = ops.OPS["awq_linear"].reference(x.float(), t["qweight"], t["qzeros"], t["scales"], bias, group_size)
    config = _config(gemv_block_m(m), block_n, block_k, 2, num_warps=1, num_stages=1)
    layout_args = {"bits": 4, "layout": "awq", "zero_offset": 0, "group_size": group_size}
    got = w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], None, bias, **layout_args, config=config,
                       path="gemv")
    tiled = w4a16_matmul(x, t["qweight"], t["qzeros"], t["scales"], None, bias, **layout_args, path="tiled")
    assert got.shape == expected.shape and got.dtype == dtype
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    assert torch.allclose(got.float(), expected, **tolerance), (got.float() - expected).abs().max()
    assert torch.allclose(got, tiled, **tolerance), (got - tiled).abs().max()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 40, 200), (3, 72, 96), (16, 40, 136), (33, 72, 200)])
def test_w8a8_quantization_is_exact_and_matmul_matches_reference(static, m, n, k):
    torch.manual_seed(m + n)
    x = torch.randn(m, k) * 2
    x[0, 3] = 30.0  # an outlier row
    x[-1, 1::7] = 0.5 * (torch.arange(1, x[-1, 1::7].numel() + 1) % 3)  # ties at .5 after scaling
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    weight_scale = torch.rand(n, 1) * 0.01
    input_scale = torch.tensor([0.25]) if static else None
    codes, scales = quantize_rows_int8(x, input_scale)
    if static:
        assert torch.equal(codes, quantize_per_tensor(x, input_scale))
    else:
        expected_codes, expected_scales = quantize_per_token(x)
        assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)
    bias = torch.randn(n)
    expected = ops.OPS["w8a8_linear"].reference(x, weight, weight_scale, input_scale, bias)
    got = int8_scaled_matmul(codes, scales, weight, weight_scale, bias, out_dtype=torch.float32)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-6), (got - expected).abs().max()


@pytest.mark.parametrize("quant_type,double_quant,blocksize,m,n,k", [
    ("nf4", True, 64, 1, 72, 200), ("nf4", False, 32, 3, 40, 136), ("fp4", True, 128, 16, 33, 70),
    ("fp4", False, 64, 33, 72, 96), ("nf4", True, 32, 16, 40, 256)])
def test_codebook4_matches_reference(quant_type, double_quant, blocksize, m, n, k):
    torch.manual_seed(n + k)
    quantized = CodebookGrid(quant_type, blocksize, double_quant).quantize(torch.randn(n, k))
    t = FORMATS["bitsandbytes"].pack(quantized, QuantConfig(method=quant_type, group_size=blocksize,
                                                            double_quant=double_quant))
    nested = ((t["weight.nested_absmax"], t["weight.nested_quant_map"], quantized.nested.offset, 256)
              if double_quant else None)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    args = (t["weight"], t["weight.absmax"], t["weight.quant_map"])
    expected = ops.OPS["codebook4_linear"].reference(x, *args, *(nested or (None, None, 0.0, 0)), blocksize, [n, k], bias)
    got = codebook4_matmul(x, *args, blocksize, (n, k), bias, nested)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_decode_shapes_take_the_split_k_path():
    assert interpreter_config(1, 72, 200)["SPLIT_K"] > 1 and interpreter_config(33, 72, 200)["SPLIT_K"] == 1


def test_modules_dispatch_to_triton_when_asked_and_keep_gradients(monkeypatch):
    from torch import nn

    import llmquant_kernels

    linear = nn.Linear(200, 72, bias=True)
    quantized = AffineGrid(4, True, 64).quantize(linear.weight.detach())
    fmt = FORMATS["gptq"]
    tensors = fmt.pack(quantized, QuantConfig(bits=4, group_size=64))
    module = fmt.build_linear("l", {"bits": 4, "group_size": 64}, {k: tuple(v.shape) for k, v in tensors.items()},
                              True, 200, 72, torch.float32)
    module.load_state_dict({**tensors, "bias": linear.bias.detach()}, assign=True)
    calls = []
    kernel = llmquant_kernels.w4a16_matmul
    monkeypatch.setattr(llmquant_kernels, "w4a16_matmul", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    x = torch.randn(3, 200)
    with torch.no_grad():
        reference = module(x)
        assert not calls  # CPU tensors: the torch reference by default
        with ops.use_backend("triton"):
            assert torch.allclose(module(x), reference, atol=1e-4)
        assert calls
    calls.clear()
    x.requires_grad_(True)
    with ops.use_backend("triton"):
        module(x).sum().backward()  # a gradient is wanted: the differentiable reference runs
    assert not calls and x.grad is not None
    monkeypatch.setenv("LLMQUANT_KERNELS", "cuda-magic")
    with pytest.raises(ConfigError, match="LLMQUANT_KERNELS"):
        module(x)


def test_kernels_install_as_llmquant_kernels_and_never_as_kernels():
    script = ("import importlib.util, llmquant_kernels\n"
              "from transformers.utils import import_utils\n"
              "spec = importlib.util.find_spec('kernels')\n"
              "print(llmquant_kernels.__file__)\n"
              "print(spec is None or spec.origin is None)\n"
              "print(import_utils.is_kernels_available())\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # from the repository root, where a folder named kernels sits on sys.path
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert Path(out[0]).parent == ROOT / "kernels" / "llmquant_kernels"
    assert out[1] == "True"  # at most an empty namespace, never our package
    assert out[2] == "False"  # transformers does not mistake it for Hugging Face's kernels


@pytest.mark.parametrize("config", [
    QuantConfig(method="rtn", bits=4, group_size=32, sym=False),
    QuantConfig(method="rtn", bits=3, group_size=-1),
    QuantConfig(method="rtn", bits=4, group_size=32, format="awq"),
    QuantConfig(method="w8a8"),
    QuantConfig(method="nf4", double_quant=True, group_size=32),
], ids=["gptq-w4g32-asym", "gptq-w3pc", "awq-w4g32", "w8a8-dynamic", "nf4-dq"])
def test_loaded_checkpoints_give_the_same_logits_on_both_backends(config, tmp_path):
    import llmquant
    from conftest import tiny_model

    qmodel = llmquant.quantize(tiny_model("llama"), config, progress=False)
    model = llmquant.load(qmodel.save(tmp_path / "ckpt"))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        with ops.use_backend("reference"):
            expected = model(ids).logits
        with ops.use_backend("triton"):
            got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
