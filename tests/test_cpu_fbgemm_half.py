"""FBGEMM's float16 GEMM (llmquant/inference/cpu/fbgemm_half.py): its products are those of the weight rounded to
float16 with fp32 rows and sums, and where it beats fp32 at every call size (capability.half_takes_every_call)
it takes every call of every path that has a float16 copy, instead of the fp32 copies and packed ops."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmquant.inference.cpu import capability, fbgemm_half, prepare_for_cpu
from test_cpu_fast import HALF_TOLERANCE, quantized_linear, random_quantized, reference_output, relative_error
from test_cpu_stacked import nf4_linear

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not fbgemm_half.available(), reason="this torch build has no FBGEMM")


@pytest.mark.parametrize("rows,in_features,out_features", [(1, 1, 3), (3, 96, 48), (130, 257, 17)])
def test_products_are_those_of_the_float16_weight_in_fp32(rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator) * 100
    got = fbgemm_half.FbgemmHalfProducts(weight)(x).double()
    exact = x.double() @ weight.half().double().t()  # the rows unrounded: float16 rows would be ~1e-3 off
    assert (got - exact).abs().max() <= 1e-5 * exact.abs().max()
    codes = torch.randint(-128, 128, (out_features, in_features), generator=generator).float()
    integers = torch.randint(-128, 128, (rows, in_features), generator=generator).float()
    assert torch.equal(fbgemm_half.FbgemmHalfProducts(codes)(integers).double(), integers.double() @ codes.double().t())


@pytest.fixture
def half_everywhere(monkeypatch):
    monkeypatch.setenv(capability.HALF_GEMV_ENV, "on")
    monkeypatch.setenv(capability.HALF_GEMM_ENV, "on")


def test_the_dequantized_cache_runs_every_call_on_it_and_keeps_no_fp32_copy(half_everywhere):
    module = nf4_linear(64, 128, seed=0)
    [layer] = prepare_for_cpu(torch.nn.Sequential(module), dtype=torch.float32)
    kernel = module.prepared.kernel
    assert kernel.dense_half.kept is not None and kernel.dense_fp32.kept is None
    assert layer.extra_bytes == 64 * 128 * 4 and "float16 (FBGEMM)" in layer.detail  # the cache and FBGEMM's copy
    for rows in (1, 7, 300):
        x = torch.randn(rows, 128)
        with torch.no_grad():
            got = module(x)
        exact = x.double() @ kernel.weight.double().t()  # the float16 cache, the rows in fp32
        assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
        assert relative_error(got, reference_output(module, x)) < HALF_TOLERANCE


def test_a_memory_bound_too_small_for_it_leaves_the_paths_as_they_were(half_everywhere):
    module = nf4_linear(64, 128, seed=0)
    prepare_for_cpu(torch.nn.Sequential(module), dtype=torch.float32, max_cache_mib=64 * 128 * 3 / 2**20)
    kernel = module.prepared.kernel
    assert kernel.dense_half.kept is None  # the float16 cache fits the bound, a second copy does not
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert torch.equal(module(x), torch.nn.functional.linear(x.half(), kernel.weight).float())


FORCED_AVX2_RUN = """
import json, torch
from llmquant.inference.cpu import prepare_for_cpu
from test_cpu_fast import quantized_linear, random_quantized, reference_output, relative_error, w8a8_module
layers = {"gptq4": quantized_linear("gptq", random_quantized(64, 256, 4, 64, False, True)),
          "gptq8": quantized_linear("gptq", random_quantized(64, 256, 8, -1, False, False)),
          "w8a8": w8a8_module(False)}
model = torch.nn.ModuleDict(layers)
paths = {layer.name: layer.detail for layer in prepare_for_cpu(model)}
ops, errors = {}, {}
for name, layer in layers.items():
    for rows in (1, 64, 256):
        x = torch.randn(rows, layer.in_features)
        with torch.no_grad(), torch.autograd.profiler.profile() as prof:
            out = layer(x)
        ops[f"{name}@{rows}"] = sorted({e.key for e in prof.key_averages()})
        errors[f"{name}@{rows}"] = relative_error(out, reference_output(layer, x))
print(json.dumps({"paths": paths, "ops": ops, "errors": errors}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"),
                    reason="the AVX2 class is forced on x86 only")
def test_the_avx2_class_runs_every_call_of_the_affine_paths_on_it(half_everywhere):
    env = {k: v for k, v in os.environ.items() if k not in ("LLMQUANT_CPU_W8A8", "DNNL_MAX_CPU_ISA")}
    env.update(capability.AVX2_CLASS_VARIABLES,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels"), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, "-c", FORCED_AVX2_RUN], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all("float16 (FBGEMM)" in detail for detail in result["paths"].values()), result["paths"]
    for name in ("gptq4", "gptq8"):  # no packed op, no fp32 matmul: FBGEMM's float16 GEMM at every size
        for rows in (1, 64, 256):
            calls = result["ops"][f"{name}@{rows}"]
            assert "quantized::linear_dynamic_fp16" in calls and "aten::_weight_int4pack_mm_for_cpu" not in calls \
                and "aten::_weight_int8pack_mm" not in calls and "aten::mm" not in calls, (name, rows, calls)
    for rows in (64, 256):  # from w8a8.FBGEMM_BESIDE_HALF_BELOW_ROWS the codes in float16, exact
        assert "quantized::linear_dynamic_fp16" in result["ops"][f"w8a8@{rows}"]
    assert "quantized::linear_dynamic" in result["ops"]["w8a8@1"]  # below it FBGEMM's int8 GEMM
    errors = result["errors"]
    assert errors["gptq8@64"] < 1e-5 and errors["w8a8@64"] < 1e-5 and errors["w8a8@256"] < 1e-5  # integer codes: float16 holds them exactly
    assert max(errors[f"gptq4@{rows}"] for rows in (1, 64, 256)) < HALF_TOLERANCE  # the weight's float16 rounding
