"""CPU fast paths (llmquant.inference.cpu): each equals the reference dequantize-then-matmul op, the selection
says which path a layer takes, and state_dict / saving are unchanged by the conversion."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmquant.inference import ops
from llmquant.config import QuantConfig
from llmquant.inference.cpu import choose_path, path_table, prepare_for_cpu, summary
from llmquant.inference.cpu import capability, dequantized, fbgemm_int8, int4pack, int8pack, selection
from llmquant.inference.cpu.w8a8 import W8A8Kernel
from llmquant.formats import FORMATS
from llmquant.grid import QuantizedWeight
from llmquant.grid.codebook import CodebookGrid
from llmquant.inference.nn import W8A8Linear

# bfloat16 activations (the packed ops' fast dtype on x86): a bf16 rounding of x, the scales and the output
BF16_TOLERANCE = 1e-2
FP32_TOLERANCE = 1e-5
HALF_TOLERANCE = 2e-3  # the dequantized cache holds float16 weights under float32 activations


def random_quantized(out_features, in_features, bits, group_size, sym, act_order, seed=0):
    """A QuantizedWeight with random codes / scales / zeros; act-order permutes which columns share a group
    the way GPTQ does (group of column perm[j] = j // group_size)."""
    gen = torch.Generator().manual_seed(seed)
    width = in_features if group_size == -1 else group_size
    groups = -(-in_features // width)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen).to(torch.uint8)
    scale = (torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3).half().float()
    zero = (torch.full((out_features, groups), 2 ** (bits - 1)) if sym
            else torch.randint(1, 2**bits, (out_features, groups), generator=gen)).to(torch.int32)
    columns = torch.arange(in_features)
    if act_order:
        perm = torch.randperm(in_features, generator=gen)
        group_index = torch.empty(in_features, dtype=torch.int64)
        group_index[perm] = columns // width
    else:
        group_index = columns // width
    return QuantizedWeight(codes, scale, zero, group_index.to(torch.int32), bits, group_size)


def quantized_linear(fmt_name, qw, bias=True, seed=0):
    fmt = FORMATS[fmt_name]
    tensors = fmt.pack(qw, QuantConfig(bits=qw.bits, group_size=qw.group_size, format=fmt_name))
    out_features, in_features = qw.codes.shape
    config = ({"bits": qw.bits, "group_size": qw.group_size, "checkpoint_format": "gptq"} if fmt_name == "gptq"
              else {"bits": 4, "group_size": qw.group_size, "version": "gemm", "zero_point": True})
    module = fmt.build_linear("layer", config, {k: tuple(v.shape) for k, v in tensors.items()}, bias,
                              in_features, out_features, torch.float32)
    if bias:
        tensors["bias"] = torch.randn(out_features, generator=torch.Generator().manual_seed(seed + 1))
    module.load_state_dict(tensors, assign=True)
    return module


def reference_output(module, x):
    with ops.use_backend("reference"):
        return module(x)


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture
def fp32_packed_ops(monkeypatch):
    """The packed ops on float32 activations (their scalar loop on x86): checks the layout conversion
    exactly, without the bfloat16 rounding of the fast dtype."""
    for path in (int4pack, int8pack):
        monkeypatch.setattr(path, "packed_compute_dtype", lambda dtype: dtype)


CASES = [  # out, in, bits, group_size, sym, act_order
    (64, 256, 4, 32, True, False),
    (64, 256, 4, 64, False, False),
    (48, 256, 4, 128, True, False),
    (32, 512, 4, 256, False, False),
    (48, 576, 4, 128, False, False),  # partial last group of 64: runs of 64
    (32, 160, 4, 64, True, False),  # groups 64, 64, 32: runs of 32
    (64, 256, 4, 64, False, True),  # act-order
    (48, 576, 4, 128, True, True),  # act-order with a partial last group
    (32, 192, 4, 96, False, False),  # a group size that is a multiple of 32 only
    (64, 192, 4, -1, False, False),  # per channel
    (64, 256, 3, 64, False, False),  # 3-bit codes are 4-bit codes
    (32, 256, 2, -1, True, True),
]


@pytest.mark.parametrize("out_features,in_features,bits,group_size,sym,act_order", CASES)
def test_int4pack_equals_reference(out_features, in_features, bits, group_size, sym, act_order, fp32_packed_ops):
    module = quantized_linear("gptq", random_quantized(out_features, in_features, bits, group_size, sym, act_order))
    assert choose_path(module)[0] is int4pack
    x = torch.randn(5, 3, in_features)  # a batch of 5 prompts of 3 tokens
    assert relative_error(module(x), reference_output(module, x)) < FP32_TOLERANCE


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7]])
def test_int4pack_in_the_fast_dtype_is_within_bf16_rounding(case):
    out_features, in_features, bits, group_size, sym, act_order = case
    module = quantized_linear("gptq", random_quantized(out_features, in_features, bits, group_size, sym, act_order))
    for rows in (1, 17):
        x = torch.randn(rows, in_features)
        assert relative_error(module(x), reference_output(module, x)) < BF16_TOLERANCE


@pytest.fixture
def dense_from_128_rows(monkeypatch):
    """Calls of 128 rows or more take the dense bf16 matmul, whether or not this CPU multiplies bf16 natively."""
    for path in (int4pack, int8pack):
        monkeypatch.setattr(path, "dense_bf16_for", lambda rows, kept=False: rows >= 128)


@pytest.mark.parametrize("fmt_name,case", [("gptq", (64, 256, 4, 64, False, True)), ("gptq", (64, 576, 4, 128, True, False)),
                                           ("gptq", (64, 256, 8, -1, False, False)), ("gptq", (64, 256, 8, 64, False, False)),
                                           ("awq", (128, 256, 4, 32, False, False))])
def test_many_rows_run_a_dense_bf16_matmul_within_bf16_rounding(fmt_name, case, dense_from_128_rows):
    from llmquant.inference.cpu.capability import cpu_capability

    module = quantized_linear(fmt_name, random_quantized(*case))
    x = torch.randn(2, 100, case[1])  # 200 rows
    assert relative_error(module(x), reference_output(module, x)) < BF16_TOLERANCE
    kernel = module.prepared.kernel
    if isinstance(kernel, int4pack.Int4PackKernel) and cpu_capability() == "AVX512":
        assert kernel.layout_block == 64  # the packed bytes were read back as the codes


@pytest.mark.parametrize("keep", [False, True])
def test_a_kept_dense_weight_takes_calls_of_fewer_rows(keep, monkeypatch):
    """With native bf16, a packed 4-bit layer whose bf16 weight is kept runs calls of
    capability.DENSE_KEPT_FROM_ROWS rows as a dense matmul (where it overtakes the packed op:
    eval/cpu_crossover.py); one whose weight would be dequantized for the call keeps the packed op there."""
    for module in (capability, selection):
        monkeypatch.setattr(module, "has_fast_bf16_matmul", lambda: True)
    monkeypatch.setattr(selection, "dense_fp32_for", lambda rows, kept=False: False)
    module = quantized_linear("gptq", random_quantized(64, 256, 4, 64, False, False), bias=False)
    prepare_for_cpu(torch.nn.Sequential(module), max_cache_mib=64 if keep else 0)
    kernel = module.prepared.kernel
    assert (kernel.dense_bf16.kept is not None) is keep
    x = torch.randn(capability.DENSE_KEPT_FROM_ROWS, 256)
    dense = F.linear(x.bfloat16(), kernel.dense_weight(torch.bfloat16)).float()
    assert torch.equal(module(x), dense) is keep
    assert relative_error(module(x), reference_output(module, x)) < BF16_TOLERANCE


@pytest.mark.parametrize("keep", [False, True])
def test_int4pack_keeps_its_bf16_weight_for_dense_calls_within_the_bound(keep, dense_from_128_rows, monkeypatch):
    """Where the CPU multiplies bf16 natively, the dequantized bf16 weight of a packed 4-bit layer is kept
    (within the memory bound) instead of made for every prefill call; both give the same numbers."""
    from llmquant.inference.cpu import prepare_for_cpu

    monkeypatch.setattr(selection, "has_fast_bf16_matmul", lambda: True)
    monkeypatch.setattr(selection, "dense_fp32_for", lambda rows, kept=False: False)
    module = quantized_linear("gptq", random_quantized(64, 256, 4, 64, False, False))
    [layer] = prepare_for_cpu(torch.nn.Sequential(module), max_cache_mib=64 if keep else 0)
    kernel = module.prepared.kernel
    assert (kernel.dense_bf16.kept is not None) is keep and kernel.dense_fp32.kept is None
    assert ("bf16 weight kept for dense calls" in layer.detail) is keep
    assert layer.extra_bytes == kernel.nbytes and (layer.extra_bytes > 64 * 256 * 2) is keep
    x = torch.randn(200, 256)
    out = module(x)
    assert torch.equal(out, torch.nn.functional.linear(x.bfloat16(), kernel.dense_weight()).float() + module.bias)
    assert relative_error(out, reference_output(module, x)) < BF16_TOLERANCE


@pytest.mark.parametrize("group_size,sym", [(32, True), (64, False), (128, False), (-1, True)])
def test_awq_runs_int4pack(group_size, sym, fp32_packed_ops):
    qw = random_quantized(64, 256, 4, group_size, sym, act_order=False, seed=group_size)
    if not sym:
        qw.zero.clamp_(min=0)
    module = quantized_linear("awq", qw)
    assert choose_path(module)[0] is int4pack
    x = torch.randn(4, 256)
    assert relative_error(module(x), reference_output(module, x)) < FP32_TOLERANCE


@pytest.mark.parametrize("out_features,in_features,bits,group_size,sym,path", [
    (48, 256, 8, -1, True, int8pack),
    (48, 256, 8, -1, False, int8pack),
    (32, 40, 4, -1, False, int8pack),  # no run of 32 divides 40: per channel still fits int8
    (48, 256, 8, 128, False, selection.dequantized),  # grouped 8-bit
    (24, 256, 4, 64, False, selection.dequantized),  # out_features not a multiple of 16
    (32, 128, 4, 16, True, selection.dequantized),  # groups narrower than the op's runs
])
def test_fallbacks_equal_reference(out_features, in_features, bits, group_size, sym, path, fp32_packed_ops):
    module = quantized_linear("gptq", random_quantized(out_features, in_features, bits, group_size, sym, False))
    [layer] = prepare_for_cpu(nn.Sequential(module))
    assert layer.path == path.NAME
    assert list(layer.refusals) == [p.NAME for p in selection.PATHS[:selection.PATHS.index(path)]]
    tolerance = HALF_TOLERANCE if path is selection.dequantized else FP32_TOLERANCE
    for x in (torch.randn(3, 2, in_features), torch.randn(1, 1, in_features)):  # many rows; the one-row gemv
        assert relative_error(module(x), reference_output(module, x)) < tolerance


def test_a_layer_never_prepared_gets_no_dequantized_cache():
    module = quantized_linear("gptq", random_quantized(48, 256, 8, 128, False, False))
    x = torch.randn(3, 256)
    assert torch.equal(module(x), reference_output(module, x))
    assert module.prepared.path == "reference"


@pytest.mark.parametrize("fast_bf16", [False, True])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_codebook_weights_run_the_dequantized_cache_in_float16(quant_type, double_quant, fast_bf16, monkeypatch):
    """The float16 cache at one row where its gemv is the faster (the tests' setting); calls of a few rows
    on the float16 cache upcast, or on the AVX2 class on the fp32 weight kept within the memory bound."""
    for module in (capability, selection):
        monkeypatch.setattr(module, "has_fast_bf16_matmul", lambda: fast_bf16)
    torch.manual_seed(1)
    weight = torch.randn(96, 160)
    config = QuantConfig(method=quant_type, double_quant=double_quant, dtype="float32")
    fmt = FORMATS["bitsandbytes"]
    tensors = fmt.pack(CodebookGrid(quant_type, 64, double_quant).quantize(weight), config)
    module = fmt.build_linear("layer", fmt.quantization_config(config), {k: tuple(v.shape) for k, v in tensors.items()},
                              False, 160, 96, torch.float32)
    module.load_state_dict(tensors, assign=True)
    layers = prepare_for_cpu(nn.Sequential(module))
    assert [layer.path for layer in layers] == ["dequantized"]
    # the float16 cache, and on the AVX2 class an fp32 copy beside it
    assert layers[0].extra_bytes == 96 * 160 * (2 if fast_bf16 else 2 + 4)
    kernel = module.prepared.kernel
    assert torch.equal(kernel.weight.float(), module.dequantized_weight().half().float())  # rounded once
    for x in (torch.randn(1, 1, 160), torch.randn(2, 7, 160)):  # a decode step; a few rows
        assert relative_error(module(x), reference_output(module, x)) < HALF_TOLERANCE
    x = torch.randn(2, 7, 160)  # a few rows: the float16 weight upcast, or the kept fp32 one
    expected = F.linear(x, kernel.weight.float() if fast_bf16 else kernel.dense_fp32.kept)
    assert torch.allclose(module(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dense", [True, False])
def test_many_rows_on_the_dequantized_cache_run_bf16_where_the_cpu_multiplies_it(dense, monkeypatch):
    """Prefill-sized calls: dense bf16 matmuls of the cached weight split in two bf16 parts where the CPU
    has native bf16 (the weight kept to float16's precision, only the input rounded to bf16), else the
    float16 weight upcast to the activations' dtype."""
    monkeypatch.setattr(dequantized, "dense_bf16_for", lambda rows, kept=False: dense and rows >= 128)
    module = quantized_linear("gptq", random_quantized(48, 256, 8, 128, False, False), bias=False)  # grouped 8-bit
    [layer] = prepare_for_cpu(nn.Sequential(module))
    assert layer.path == "dequantized"
    weight = module.prepared.kernel.weight
    x = torch.randn(2, 100, 256)  # 200 rows
    out = module(x)
    if dense:
        high = weight.bfloat16()
        low = (weight.float() - high.float()).bfloat16()
        assert torch.equal(high.float() + low.float(), weight.float())  # the parts hold the cache exactly
        x16 = x.bfloat16()
        assert torch.equal(out, F.linear(x16, high).float() + F.linear(x16, low).float())
        assert relative_error(out, reference_output(module, x)) < BF16_TOLERANCE
    else:
        assert torch.equal(out, F.linear(x, weight.float()))
        assert relative_error(out, reference_output(module, x)) < HALF_TOLERANCE


def test_a_kept_fp32_copy_takes_the_calls_below_the_bf16_split(monkeypatch):
    """With native bf16 and the fp32 copy kept (the float16 gemv not the faster), calls of fewer than
    dequantized.SPLIT_FROM_ROWS rows run on the fp32 copy; from there the float16 cache split into bf16
    parts for the call."""
    monkeypatch.setenv("LLMQUANT_CPU_HALF_GEMV", "off")
    for module in (capability, selection):
        monkeypatch.setattr(module, "has_fast_bf16_matmul", lambda: True)
    monkeypatch.setattr(selection, "dense_fp32_for", lambda rows, kept=False: False)
    module = quantized_linear("gptq", random_quantized(48, 256, 8, 128, False, False), bias=False)  # grouped 8-bit
    [layer] = prepare_for_cpu(nn.Sequential(module))
    kernel = module.prepared.kernel
    assert layer.path == "dequantized" and kernel.dense_fp32.kept is not None
    x = torch.randn(dequantized.SPLIT_FROM_ROWS - 1, 256)
    assert torch.equal(module(x), F.linear(x, kernel.dense_fp32.kept))
    x = torch.randn(dequantized.SPLIT_FROM_ROWS, 256)
    high, low = dequantized.bf16_parts(kernel.weight)
    assert torch.equal(module(x), F.linear(x.bfloat16(), high).float() + F.linear(x.bfloat16(), low).float())


def w8a8_module(static):
    torch.manual_seed(0)
    module = W8A8Linear(96, 48, static=static, bias=True, dtype=torch.float32)
    module.weight.copy_(torch.randint(-128, 128, (48, 96), dtype=torch.int8))
    module.weight_scale.copy_(torch.rand(48, 1) * 0.01 + 1e-3)
    module.bias.copy_(torch.randn(48))
    if static:
        module.input_scale.copy_(torch.tensor([0.02]))
    return module


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_variants_keep_reference_numerics(static):
    module = w8a8_module(static)
    assert choose_path(module)[0].NAME == "w8a8"
    x = torch.randn(3, 5, 96) * 2
    expected = reference_output(module, x)
    assert torch.equal(W8A8Kernel([module], torch.float32, variant="int_mm")(x), expected)
    if fbgemm_int8.available():
        assert torch.equal(W8A8Kernel([module], torch.float32, variant="fbgemm")(x), expected)
    assert relative_error(W8A8Kernel([module], torch.float32, variant="int8pack")(x), expected) < FP32_TOLERANCE
    assert relative_error(module(x), expected) < BF16_TOLERANCE  # the one this CPU chose


def test_w8a8_variant_can_be_chosen_and_a_bad_one_is_refused(monkeypatch):
    from llmquant.inference.cpu import w8a8
    from llmquant.errors import ConfigError

    module = w8a8_module(False)
    for variant in w8a8.runnable_variants():
        monkeypatch.setenv(w8a8.VARIANT_ENV, variant)
        assert W8A8Kernel([module], torch.float32).variant == variant
    monkeypatch.setenv(w8a8.VARIANT_ENV, "vnni")
    with pytest.raises(ConfigError, match="LLMQUANT_CPU_W8A8 must be one of"):
        module(torch.randn(2, 96))


def test_w8a8_without_fbgemm_falls_back_and_refuses_it_by_name(monkeypatch):
    """A torch build without FBGEMM (or without quantized tensors): the CPU class without an int8 dot
    product takes the dense fp32 codes, and asking for fbgemm is refused, naming the variable."""
    from llmquant.inference.cpu import w8a8
    from llmquant.errors import ConfigError

    def quantized_tensors_removed(*args, **kwargs):
        raise RuntimeError("quantized tensors are gone from this build")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "_make_per_channel_quantized_tensor", quantized_tensors_removed)
        assert fbgemm_int8.available.__wrapped__() is False  # the probe itself, past its cache
    monkeypatch.setattr(fbgemm_int8, "available", lambda: False)
    monkeypatch.setattr(w8a8, "has_int8_dot_product", lambda: False)
    assert w8a8.runnable_variants() == ("int_mm", "int8pack")
    assert w8a8.variant_here() == "int8pack"
    monkeypatch.setenv(w8a8.VARIANT_ENV, "fbgemm")
    with pytest.raises(ConfigError, match="LLMQUANT_CPU_W8A8=fbgemm, but this torch build has no FBGEMM"):
        w8a8.variant_here()


def test_selection_report_state_dict_and_reconversion():
    qw = random_quantized(64, 256, 4, 64, False, act_order=True)
    fast, grouped8 = quantized_linear("gptq", qw), quantized_linear("gptq", random_quantized(48, 256, 8, 128, False, False))
    model = nn.Sequential(fast, grouped8, w8a8_module(False))
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = prepare_for_cpu(model, max_cache_mib=0)  # no room for a dequantized weight
    assert [(layer.name, layer.path) for layer in layers] == [("0", "int4pack"), ("1", "reference"), ("2", "w8a8")]
    assert "act-order" in layers[0].detail and "memory bound" in layers[1].refusals["dequantized"]
    assert summary(layers).startswith("1 int4pack, 1 w8a8, 1 reference")
    assert "not int4pack: 8-bit codes do not fit 4 bits" in path_table(layers)
    state = model.state_dict()
    assert state.keys() == keys_before.keys() and all(torch.equal(state[k], keys_before[k]) for k in state)
    # new source tensors (a load_state_dict with assign, as after a move) are converted again
    x = torch.randn(2, 256)
    before = fast(x)
    fast.load_state_dict({k: v * 0 if k == "scales" else v for k, v in fast.state_dict().items()}, assign=True)
    assert not torch.equal(fast(x), before) and torch.all(fast(x) == fast.bias)


def test_gradients_through_x_take_the_reference():
    module = quantized_linear("gptq", random_quantized(32, 128, 4, 32, True, False))
    x = torch.randn(2, 128, requires_grad=True)
    module(x).sum().backward()
    assert x.grad is not None and module.prepared is None


@pytest.fixture
def tiny_checkpoint(tmp_path, smollm2_path):
    """A tiny random llama quantized to 4 bits (int4pack), one down_proj at 8 bits per channel (int8pack)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmquant
    from conftest import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)  # so that the borrowed tokenizer's ids fit
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    quant = QuantConfig(method="rtn", bits=4, group_size=32, dtype="float32",
                        layer_overrides={"model.layers.1.mlp.down_proj": {"bits": 8, "group_size": -1}})
    qmodel = llmquant.quantize(model, quant, progress=False)
    qmodel.tokenizer = tokenizer
    return qmodel.save(tmp_path / "ckpt")


def test_info_and_load_log_report_each_layer_path(tiny_checkpoint, capsys, caplog):
    import logging

    import llmquant
    from llmquant.cli import main

    with caplog.at_level(logging.DEBUG, logger="llmquant.inference.cpu"):
        llmquant.load(tiny_checkpoint)
    assert "CPU paths: 13 int4pack, 1 int8pack" in caplog.text
    assert "model.layers.1.mlp.down_proj: int8pack" in caplog.text
    assert "CPU output head: its own forward" in caplog.text  # dtype="float32": no float16 numbers
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "paths: 13 int4pack, 1 int8pack" in out
    assert "output head: its own forward" in out
    lines = [line for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(lines) == 14 and all(" int4pack " in line for line in lines if "1.mlp.down_proj" not in line)
    assert "not int4pack: 8-bit codes do not fit 4 bits" in next(line for line in lines if "1.mlp.down_proj" in line)


def test_generate_streams_takes_threads_and_prints_speeds(tiny_checkpoint, capsys):
    from llmquant.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["generate", str(tiny_checkpoint), "--prompt", "The capital of France is",
                     "--max-new-tokens", "6", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert captured.out.startswith("The capital of France is")
    assert "prefill" in captured.err and "decode" in captured.err and "tok/s (1 thread)" in captured.err
    assert main(["generate", str(tiny_checkpoint), "--prompt", "x", "--threads", "0"]) == 2


@pytest.mark.skipif(not fbgemm_int8.available(), reason="this torch build has no FBGEMM")
@pytest.mark.parametrize("rows,in_features,out_features", [(1, 1, 3), (3, 96, 48), (130, 257, 17)])
def test_fbgemm_products_are_the_exact_integer_products(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    codes = torch.randint(-128, 128, (rows, in_features), generator=generator).float()
    codes[0, 0], codes[-1, -1] = -128, 127  # both ends of the int8 range, which 8-bit pairs would saturate on
    exact = codes.double() @ weight.double().t()
    assert torch.equal(fbgemm_int8.FbgemmInt8Products(weight)(codes).double(), exact)
