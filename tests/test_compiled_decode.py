"""Loaded checkpoints of every format compile whole: torch.compile(fullgraph=True) traces them on their
default CPU paths without a graph break and computes the eager logits; stacked q/k/v and gate/up
become one matmul in the compiled graph; generate's compiled decode (static cache) gives the eager
tokens. The inductor cases (C++ code generation, ~10-30 s each) are in the slow suite."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmquant
from conftest import tiny_config
from llmquant.config import QuantConfig
from llmquant.inference.cpu import capability
from llmquant.inference.generation import compiled_decode_options, timed_generate
from test_cpu_fast import tiny_checkpoint  # noqa: F401 (a fixture)
from test_pack_quantized import write_pack_quantized

# name -> QuantConfig fields (None: a pack-quantized file written by hand, llmquant does not write it)
FORMATS = {
    "gptq w4 g32": dict(method="rtn", bits=4, group_size=32),
    "gptq w8 per channel": dict(method="rtn", bits=8, group_size=-1, sym=True),
    "awq w4 g32": dict(method="rtn", bits=4, group_size=32, format="awq"),
    "w8a8 dynamic": dict(method="w8a8", act_quant="dynamic"),
    "w8a8 static": dict(method="w8a8", act_quant="static"),
    "nf4 double quant": dict(method="nf4", double_quant=True),
    "fp8": dict(method="fp8"),
    "fp8 block": dict(method="fp8-block", group_size=32),
    "pack-quantized w4 asym": None,
}
INDUCTOR_FORMATS = ("gptq w4 g32", "gptq w8 per channel", "w8a8 dynamic", "nf4 double quant", "fp8",
                    "pack-quantized w4 asym")
CALIB = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
# Row counts: a decode step, a short prompt (from capability.DENSE_KEPT_FROM_ROWS: the native class's dense
# bf16 path), and one past capability.DENSE_FP32_FROM_ROWS (the dense paths of the AVX2 class)
LENGTHS = (1, 8, 40)


def _write(name: str, folder: Path) -> Path:
    fields = FORMATS[name]
    if fields is None:
        write_pack_quantized(folder, 4, 32, False)
        return folder
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    # float16 storage (the default): the head's weights are float16 numbers, so its decode gemv runs too
    config = QuantConfig(**fields)
    calib = CALIB if config.method == "w8a8" and config.act_quant == "static" else None
    return llmquant.quantize(model, config, calib=calib, progress=False).save(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    return {name: _write(name, root / name.replace(" ", "-")) for name in FORMATS}


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))


class GraphCounter:
    """A torch.compile backend that runs the traced graphs as they are and keeps them."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


# one format per CPU path in the fast suite (int4pack, w8a8, dequantized, a custom op); all in the slow one
FAST_FORMATS = ("gptq w4 g32", "w8a8 dynamic", "nf4 double quant", "fp8")


@pytest.mark.parametrize("name", [name if name in FAST_FORMATS else pytest.param(name, marks=pytest.mark.slow)
                                  for name in FORMATS])
def test_every_format_compiles_whole_and_gives_the_eager_logits(checkpoints, name):
    model = llmquant.load(checkpoints[name], device="cpu").eval()
    for length in LENGTHS:
        ids = _ids(length)
        with torch.no_grad():
            eager = model(ids).logits
            counter = GraphCounter()
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True, backend=counter)(ids).logits  # raises at a graph break
        assert len(counter.graphs) == 1, (name, length)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=f"{name}, {length} tokens")


def test_the_head_gemv_and_the_cpu_paths_are_what_the_graph_runs(checkpoints):
    """Not the reference ops: the traced graph calls the packed CPU op and the head's float16 product (FBGEMM's,
    a custom op, or torch's float16 gemv where torch has no FBGEMM)."""
    model = llmquant.load(checkpoints["gptq w4 g32"], device="cpu").eval()
    counter = GraphCounter()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=counter)(_ids(1))
    code = counter.graphs[0].code
    assert "_weight_int4pack_mm_for_cpu" in code and "llmquant.gptq_linear" not in code
    head = "llmquant.fbgemm_half_products" if capability.fbgemm_half.available() else "torch.float16"
    assert head in code


def test_stacked_linears_become_one_matmul_in_the_compiled_graph(checkpoints):
    """Each of q/k/v and gate/up traces the stacked matmul of its group; merging common subexpressions,
    as inductor's freezing does (llmquant.inference.generation compiles with it), keeps one per group."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compile_utils import fx_graph_cse

    model = llmquant.load(checkpoints["gptq w4 g32"], device="cpu").eval()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        # fewer rows than any class's dense threshold for a kept weight: every call takes the packed op
        rows = min(capability.DENSE_KEPT_FROM_ROWS, capability.DENSE_FP32_KEPT_FROM_ROWS) - 1
        torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep))(_ids(rows))

    def matmuls(graph):
        return sum(node.target is torch.ops.aten._weight_int4pack_mm_for_cpu.default for node in graph.nodes)

    blocks = len(model.model.layers)
    assert matmuls(graphs[0].graph) == 7 * blocks  # as traced: each member its group's matmul
    assert matmuls(fx_graph_cse(graphs[0].graph)) == 4 * blocks  # q/k/v, o, gate/up, down


def test_compiled_decode_gives_the_eager_tokens_and_transformers_compiles_on_the_cpu(checkpoints):
    model = llmquant.load(checkpoints["w8a8 dynamic"], device="cpu").eval()
    inputs = {"input_ids": _ids(5), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    eager, _ = timed_generate(model, inputs, 8, exact_length=True)
    options = compiled_decode_options(model)
    assert options["compile_config"].fullgraph and options["cache_implementation"] == "static"
    assert options["compile_config"].options["freezing"]
    # what is asked of transformers, without inductor's minutes
    options = compiled_decode_options(model, backend="eager")
    assert options["compile_config"].backend == "eager" and options["compile_config"].options is None
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, **options)
    # the private switch transformers reads (generation_config.compile_config._compile_all_devices) made it
    # compile here: it keeps the compiled call on the model
    assert getattr(model, "_compiled_call", None) is not None
    assert torch.equal(compiled, eager)


def test_the_cpu_class_is_marked_constant_as_torch_marks_it():
    """capability sets torch.compiler.assume_constant_result's mark itself (so that importing it does not import
    torch._dynamo): the mark must stay the one torch sets, or dynamo would trace into the CPU probes."""
    assert vars(capability.assume_constant_result(lambda: 0)) == vars(torch.compiler.assume_constant_result(lambda: 0))
    assert capability.has_int8_dot_product._dynamo_marked_constant


def _compile_under_avx2_class(folders, backend: str, tmp_path, tolerance: float, **variables) -> None:
    """torch.compile of each checkpoint under the forced AVX2 class (a fresh process: torch reads the class
    at import), logits against eager at 1 and 40 tokens."""
    script = tmp_path / "check.py"
    script.write_text(
        "import json, sys, torch, llmquant\n"
        "from llmquant.inference.cpu.capability import cpu_class\n"
        "assert cpu_class().capability == 'AVX2', cpu_class()\n"
        "torch.manual_seed(0)\n"  # the same ids on every run: a failure repeats, and names its checkpoint
        "for folder in json.loads(sys.argv[1]):\n"
        "    model = llmquant.load(folder, device='cpu').eval()\n"
        "    for length in (1, 40):\n"
        "        ids = torch.randint(0, 128, (1, length))\n"
        "        with torch.no_grad():\n"
        "            eager = model(ids).logits\n"
        "            torch._dynamo.reset()\n"
        f"            got = torch.compile(model, fullgraph=True, backend={backend!r})(ids).logits\n"
        f"        torch.testing.assert_close(got, eager, rtol={tolerance}, atol={tolerance}, msg=lambda m: folder + ': ' + m)\n"
        "print('ok')\n")
    # inductor's cache keys miss a forced capability (eval/bench_cpu.py): a cache of this class's own
    env = {**os.environ, **capability.AVX2_CLASS_VARIABLES, "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-avx2"), **variables}
    result = subprocess.run([sys.executable, str(script), json.dumps([str(f) for f in folders])], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_compiled_paths_of_the_avx2_class(checkpoints, tmp_path):
    """The dense fp32 paths (40 rows) and W8A8 without an int8 dot product (FBGEMM, a custom op in the graph)
    trace whole too."""
    names = ("gptq w4 g32", "gptq w8 per channel", "w8a8 static", "nf4 double quant")
    _compile_under_avx2_class([checkpoints[n] for n in names], "eager", tmp_path, 1e-5)


@pytest.mark.skipif(not capability.fbgemm_half.available(), reason="this torch build has no FBGEMM")
@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_float16_paths_of_the_avx2_class(checkpoints, tmp_path, backend):
    """Where FBGEMM's float16 GEMM takes every call (a custom op in the graph, as the head's one-row product),
    every format traces whole on it."""
    names = ("gptq w4 g32", "gptq w8 per channel", "w8a8 dynamic", "nf4 double quant")
    _compile_under_avx2_class([checkpoints[n] for n in names], backend, tmp_path, 1e-5 if backend == "eager" else 1e-4,
                              **{capability.HALF_GEMV_ENV: "on", capability.HALF_GEMM_ENV: "on"})


@pytest.mark.slow
def test_inductor_compiles_the_avx2_class_paths(checkpoints, tmp_path):
    _compile_under_avx2_class([checkpoints[n] for n in ("w8a8 dynamic", "nf4 double quant")], "inductor", tmp_path,
                              1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", INDUCTOR_FORMATS)
def test_inductor_compiles_every_cpu_path_to_the_eager_logits(checkpoints, name):
    model = llmquant.load(checkpoints[name], device="cpu").eval()
    for length in (1, 40):
        ids = _ids(length)
        with torch.no_grad():
            eager = model(ids).logits
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)(ids).logits
        # inductor may reorder float sums (its own reductions, fused epilogues)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4, msg=f"{name}, {length} tokens")


@pytest.mark.slow
def test_generate_compile_prints_its_compile_time_and_gives_the_eager_tokens(tiny_checkpoint, capsys):
    from llmquant.cli import main

    model = llmquant.load(tiny_checkpoint, device="cpu").eval()
    inputs = {"input_ids": _ids(6), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    eager, _ = timed_generate(model, inputs, 10, exact_length=True)
    torch._dynamo.reset()
    compiled, speed = timed_generate(model, inputs, 10, exact_length=True, compile_decode=True)
    assert torch.equal(compiled, eager)
    assert speed.decode_steps == 8 and speed.compile_seconds > 0
    assert "compiled; compiling the decode step took" in speed.describe()
    assert main(["generate", str(tiny_checkpoint), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                 "--compile", "--threads", "1"]) == 0
    assert "compiling the decode step took" in capsys.readouterr().err
