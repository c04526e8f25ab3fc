"""The CPU class llmquant plans for follows the overrides torch and oneDNN follow (forced in a subprocess,
since both are read once per process), and each class gets its own paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmquant.inference.cpu.capability import AVX2_CLASS_VARIABLES

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, torch
from llmquant.inference.cpu import capability, w8a8
c = capability.cpu_class()
print(json.dumps({"capability": c.capability, "int8": c.int8_dot_product, "bf16": c.fast_bf16_matmul,
                  "describe": c.describe(), "w8a8": w8a8.variant_here(),
                  "dense_bf16_512": capability.dense_bf16_for(512), "dense_fp32_512": capability.dense_fp32_for(512),
                  "raw": [torch.cpu._is_vnni_supported(), torch.cpu._is_avx512_bf16_supported(),
                          torch.cpu._is_amx_tile_supported()]}))
"""


def probe(**variables) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in (*AVX2_CLASS_VARIABLES, "DNNL_MAX_CPU_ISA", "LLMQUANT_CPU_W8A8")}
    env.update(variables)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "kernels"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


x86 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="an x86 class")


@x86
def test_avx2_forced_class_has_no_int8_dot_product_and_no_native_bf16():
    got = probe(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert got["capability"] == "AVX2"
    assert not got["int8"] and not got["bf16"]
    assert got["w8a8"] == "fbgemm"  # W8A8 takes no oneDNN int8 GEMM (it saturates), but FBGEMM's on 7-bit rows
    assert not got["dense_bf16_512"] and got["dense_fp32_512"]  # prefill-sized calls: dense fp32
    assert got["describe"].startswith("AVX2 class (no int8 dot product, no native bf16)")
    if any(got["raw"]):
        assert "ATEN_CPU_CAPABILITY=avx2" in got["describe"]  # says why the CPU's own features are off


@x86
def test_onednn_cap_alone_turns_off_what_onednn_runs():
    got = probe(ONEDNN_MAX_CPU_ISA="AVX2")
    assert not got["int8"] and not got["bf16"] and got["w8a8"] == "fbgemm"
    if any(got["raw"]):
        assert "ONEDNN_MAX_CPU_ISA=AVX2 is below" in got["describe"]


@x86
def test_native_class_is_what_the_cpu_has():
    got = probe()
    vnni, bf16, amx = got["raw"]
    assert got["int8"] == (vnni or amx) and (got["w8a8"] == "int_mm") == got["int8"]
    assert got["bf16"] == (bf16 or amx) and got["dense_bf16_512"] == got["bf16"]
    assert got["dense_fp32_512"] == (not got["bf16"])


def test_the_class_is_named_in_the_load_log(caplog):
    import logging

    from llmquant.inference.cpu import capability
    from llmquant.inference.cpu.selection import prepare_for_cpu
    from test_cpu_fast import quantized_linear, random_quantized

    model = torch.nn.Sequential(quantized_linear("gptq", random_quantized(64, 256, 4, 64, True, False)))
    with caplog.at_level(logging.INFO, logger="llmquant.inference.cpu"):
        prepare_for_cpu(model)
    assert f"CPU class: {capability.describe()}" in caplog.text


# What each class runs, per call size: the AVX2 class's dense fp32 calls keep the reference numerics.
FORCED_AVX2_RUN = """
import json, torch
from llmquant.inference.cpu import prepare_for_cpu
from test_cpu_fast import quantized_linear, random_quantized, w8a8_module
layers = {"gptq4": quantized_linear("gptq", random_quantized(64, 256, 4, 64, False, False)),
          "gptq8": quantized_linear("gptq", random_quantized(64, 256, 8, -1, True, False)),
          "w8a8": w8a8_module(False)}
model = torch.nn.ModuleDict(layers)
prepare_for_cpu(model)
ops = {}
for name, layer in layers.items():
    for rows in (1, 64, 256):
        with torch.autograd.profiler.profile() as prof:
            layer(torch.randn(rows, layer.in_features))
        ops[f"{name}@{rows}"] = sorted({e.key for e in prof.key_averages()})
print(json.dumps(ops))
"""

PACKED_OPS = ("aten::_int_mm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")


@x86
def test_avx2_class_prefill_takes_no_int8_gemm_and_no_packed_op():
    env = {k: v for k, v in os.environ.items() if k not in ("LLMQUANT_CPU_W8A8", "DNNL_MAX_CPU_ISA")}
    env.update(AVX2_CLASS_VARIABLES,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, "-c", FORCED_AVX2_RUN], env=env, capture_output=True, text=True,
                          check=True)
    ops = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("gptq4", "gptq8", "w8a8"):
        assert not set(PACKED_OPS) & set(ops[f"{name}@64"]), (name, ops[f"{name}@64"])
        assert "aten::_int_mm" not in ops[f"{name}@1"]
    assert "aten::_weight_int4pack_mm_for_cpu" in ops["gptq4@1"]  # decode keeps the packed op
    assert "aten::_weight_int8pack_mm" in ops["gptq8@1"]
    for rows in (1, 64):
        assert "quantized::linear_dynamic" in ops[f"w8a8@{rows}"]  # FBGEMM's exact int8 GEMM
    assert "quantized::linear_dynamic" not in ops["w8a8@256"]  # from FBGEMM_BELOW_ROWS: the dense fp32 codes


@pytest.fixture
def avx2_dense(monkeypatch):
    """The AVX2 class's row thresholds for its dense fp32 matmul, and no native bf16, whatever this CPU is."""
    from llmquant.inference.cpu import capability, dequantized, int4pack, int8pack, selection

    def dense(rows, kept=False):
        return rows >= (capability.DENSE_FP32_KEPT_FROM_ROWS if kept else capability.DENSE_FP32_FROM_ROWS)

    for module in (int4pack, int8pack, selection):
        monkeypatch.setattr(module, "dense_fp32_for", dense)
    for module in (int4pack, int8pack, dequantized):
        monkeypatch.setattr(module, "dense_bf16_for", lambda rows, kept=False: False)
    monkeypatch.setattr(selection, "has_fast_bf16_matmul", lambda: False)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("case", [(64, 256, 4, 64, False, True), (64, 576, 4, 128, True, False),
                                  (64, 256, 8, -1, False, False)])
def test_dense_fp32_calls_equal_the_reference(case, keep, avx2_dense):
    from llmquant.inference.cpu import prepare_for_cpu
    from test_cpu_fast import FP32_TOLERANCE, quantized_linear, random_quantized, reference_output, relative_error

    module = quantized_linear("gptq", random_quantized(*case))
    prepare_for_cpu(torch.nn.Sequential(module), max_cache_mib=64 if keep else 0)
    kernel = module.prepared.kernel
    assert (kernel.dense_fp32.kept is not None) is keep
    x = torch.randn(2, 40, case[1])  # 80 rows
    assert relative_error(module(x), reference_output(module, x)) < FP32_TOLERANCE


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("variant", ["fbgemm", "int8pack"])
@pytest.mark.parametrize("keep", [False, True])
def test_w8a8_without_int8_dot_product_keeps_reference_numerics(static, variant, keep, monkeypatch):
    from llmquant.inference.cpu import fbgemm_int8, prepare_for_cpu, w8a8
    from test_cpu_fast import FP32_TOLERANCE, reference_output, relative_error, w8a8_module

    if variant == "fbgemm" and not fbgemm_int8.available():
        pytest.skip("this torch build has no FBGEMM")
    monkeypatch.setenv(w8a8.VARIANT_ENV, variant)
    module = w8a8_module(static)
    prepare_for_cpu(torch.nn.Sequential(module), max_cache_mib=64 if keep else 0)
    kernel = module.prepared.kernel
    assert kernel.variant == variant
    assert (kernel.dense_fp32.kept is not None) is keep
    for rows in (1, 64, w8a8.FBGEMM_BELOW_ROWS):  # decode, a short prompt, prefill (fbgemm: the dense fp32 codes)
        x = torch.randn(rows, 96) * 2
        if static:
            x[0, :3] = torch.tensor([-9.0, 9.0, 0.0])  # codes saturated at -128 / 127, and a zero
        expected = reference_output(module, x)
        if variant == "fbgemm" and rows < w8a8.FBGEMM_BELOW_ROWS:
            assert torch.equal(module(x), expected)  # the reference's exact integer sums, scaled in its order
        else:
            assert relative_error(module(x), expected) < FP32_TOLERANCE


def test_dequantized_cache_keeps_an_fp32_copy_for_prefill_within_the_bound(avx2_dense):
    from llmquant.inference.cpu import prepare_for_cpu
    from test_cpu_fast import HALF_TOLERANCE, quantized_linear, random_quantized, reference_output, relative_error

    for mib, kept in ((64, True), (0.03, False)):  # 0.03 MiB: the float16 cache (24 KiB) fits, an fp32 copy not
        module = quantized_linear("gptq", random_quantized(48, 256, 8, 128, False, False), bias=False)  # grouped 8-bit
        [layer] = prepare_for_cpu(torch.nn.Sequential(module), max_cache_mib=mib)
        assert layer.path == "dequantized"
        kernel = module.prepared.kernel
        assert (kernel.dense_fp32.kept is not None) is kept
        assert layer.extra_bytes == 48 * 256 * (6 if kept else 2)
        x = torch.randn(2, 40, 256)
        out = module(x)
        # kept: the reference's fp32 weight; else the float16 cache upcast for the call
        weight = module.dequantized_weight(torch.float32) if kept else kernel.weight.float()
        assert torch.equal(out, torch.nn.functional.linear(x, weight))
        assert relative_error(out, reference_output(module, x)) < HALF_TOLERANCE


def test_activation_codes_as_float_are_the_int8_codes_exactly():
    """The activation codes, int8 and as fp32 numbers (the dense fp32 W8A8 path), equal the grid's
    definition written out here, clamp included (which the per-token codes skip as a no-op): rows of
    every magnitude, all-zero and one-sided rows, static scales that saturate and that do not."""
    from llmquant.grid.activations import (quantize_per_tensor, quantize_per_tensor_as_float, quantize_per_token,
                                           quantize_per_token_as_float)

    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-14, 6, 64)[:, None]
    x[0] = 0
    x[1] = 0
    x[1, 5] = 1e-30
    x[2] = -x[2].abs()
    x[3] = x[3].abs()
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)
    expected = torch.clamp(torch.round(x / scale), -128, 127)
    codes, token_scale = quantize_per_token(x)
    float_codes, float_scale = quantize_per_token_as_float(x)
    assert torch.equal(token_scale, scale) and torch.equal(float_scale, scale)
    assert codes.dtype == torch.int8 and torch.equal(codes.float(), expected) and torch.equal(float_codes, expected)
    for static in (torch.tensor([0.01]), torch.tensor([1e3])):  # saturating and not
        expected = torch.clamp(torch.round(x / static), -128, 127)
        assert torch.equal(quantize_per_tensor(x, static).float(), expected)
        assert torch.equal(quantize_per_tensor_as_float(x, static), expected)
