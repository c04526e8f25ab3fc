"""GPU readiness without a GPU: the compile proof (llmquant_kernels.aot) and the launcher's use of its
recorded table.

The fast suite checks that the recorded table (kernels/llmquant_kernels/compiled.json) is current
for every combination the launchers can choose (kernel source and Triton unchanged), that it holds
no compile error and leaves every shape class a configuration on every GPU class, and recompiles a
sample to the same numbers; the slow suite recompiles every combination. Compiling needs a process
without TRITON_INTERPRET, so aot runs in a subprocess."""
import os
import subprocess
import sys
import types

import pytest
import torch

from llmquant_kernels import SPECS, _launch, codebook4, fp8, w4a16

A100_EXAMPLE = "m16 n64 k256 s2 w4 st3"  # the candidate the issue found too big for an A100


def _aot(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "llmquant_kernels.aot", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_recorded_compiles_are_current_cover_every_gpu_class_and_a_sample_recompiles_to_them():
    done = _aot("--check", "--sample", "--jobs", str(min(4, os.cpu_count() or 1)), timeout=580)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "checking" in done.stderr and "PROBLEM" not in done.stdout


@pytest.mark.compile_proof
@pytest.mark.timeout(7200)
def test_every_kernel_config_dtype_and_target_compiles_as_recorded():
    done = _aot("--check", "--jobs", str(os.cpu_count() or 1), timeout=7000)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


@pytest.fixture
def fake_gpu(monkeypatch):
    """install(capability, shared): pick_config runs as on a CUDA device of that capability, whose
    launches (timed by do_bench) are recorded instead of run."""
    import triton.testing

    monkeypatch.setattr(_launch, "INTERPRETING", False)
    monkeypatch.setattr(_launch, "_TUNED", {})
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())

    def install(capability, shared=None):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        properties = types.SimpleNamespace(**({"shared_memory_per_block_optin": shared} if shared else {}))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)

    return install


def _tuned(spec, constants, m, dtype=torch.float16):
    tried = []

    def launch(config):
        tried.append(_launch.config_id(config))
        return float(len(tried))

    _launch._TUNED.clear()
    x = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)
    _launch.pick_config(spec, constants, m, 4096, 4096, x, launch)
    return tried


def test_the_launcher_drops_what_the_recorded_table_says_a_gpu_cannot_launch(fake_gpu):
    table = _launch.recorded_table()
    constants = {"BITS": 4, "LAYOUT": 0, "ZERO_OFFSET": 1, "HAS_BIAS": False, "IEEE_FP32": False}
    decode = [_launch.config_id(c) for c in _launch.GPU_CANDIDATES["decode"]]

    def needs(config, target):
        return table[("w4a16", "gptq-4bit", "float16", config, target)]["shared"]

    fake_gpu((9, 0), 232448)  # H100: every decode candidate fits
    assert _tuned(w4a16.W4A16, constants, 16) == decode
    fake_gpu((8, 0), 166912)  # A100: the ones over 163 KB never launch
    a100 = _tuned(w4a16.W4A16, constants, 16)
    assert A100_EXAMPLE not in a100 and needs(A100_EXAMPLE, 80) > 166912
    assert a100 == [c for c in decode if needs(c, 80) <= 166912]
    fake_gpu((8, 6))  # A10 / RTX 3090: sm_80's records, the 99 KB of the table when torch does not say
    assert _tuned(w4a16.W4A16, constants, 16) == [c for c in decode if needs(c, 80) <= 101376] != a100
    # the GEMV's candidates by M rounded up; bf16 is its own specialization
    gemv = _tuned(w4a16.W4A16_GEMV, constants, 3, torch.bfloat16)
    assert gemv and all(c.startswith("m4 ") for c in gemv)
    # a kernel a GPU cannot run at all is refused by name, not by a compile error in the tuner
    with pytest.raises(RuntimeError, match=r"fp8_block needs a GPU of compute capability 8\.9 or higher, this one is 8\.6"):
        _tuned(fp8.FP8_BLOCK, {"HAS_BIAS": False, "IEEE_FP32": False}, 1)
    fake_gpu((12, 0), 101376)  # a GPU no target stands for: every candidate goes to the tuner
    assert len(_tuned(codebook4.CODEBOOK4, {"NESTED": True}, 512)) == len(_launch.GPU_CANDIDATES["gemm"])


def test_every_combination_the_launchers_choose_is_in_the_recorded_table():
    """Without compiling (the subprocess test checks the numbers): every kernel x variant x dtype x
    configuration x target the launchers can choose has a record, and the launchers choose only
    configurations that were enumerated."""
    table = _launch.recorded_table()
    missing = [(s.name, v, d, _launch.config_id(c), t) for s in SPECS for v in s.variants for d in s.dtypes
               for c in s.gpu_configs() for t in s.targets
               if (s.name, v, d, _launch.config_id(c), t) not in table]
    assert not missing, missing[:5]
    for spec in SPECS:
        for m in (1, 3, 8, 9, 16, 17, 128, 129, 4096):
            if spec.space != "gemv" or m <= _launch.GEMV_MAX_M:
                assert all(c in spec.gpu_configs() for c in spec.candidates(m))


def test_float32_activations_on_a_gpu_run_the_reference_not_an_unproven_kernel(monkeypatch):
    """The kernels are compiled (and proven) for 16-bit activations on a GPU; float32 there goes to
    the torch reference, 16-bit to the kernel."""
    import llmquant_kernels

    from llmquant.inference import ops
    from llmquant.inference.ops import triton as triton_ops

    monkeypatch.setitem(ops.OPS, "gptq_linear", ops.registry.Op("gptq_linear", lambda x, *args: "reference", None))
    monkeypatch.setattr(llmquant_kernels, "w4a16_matmul", lambda x, *args, **kwargs: "kernel")
    for dtype, expected in ((torch.float32, "reference"), (torch.float16, "kernel"), (torch.bfloat16, "kernel")):
        x = types.SimpleNamespace(is_cuda=True, dtype=dtype)
        assert triton_ops.gptq_linear(x, None, None, None, None, None, 4, 1) == expected
    cpu = types.SimpleNamespace(is_cuda=False, dtype=torch.float32)  # the interpreter takes float32
    assert triton_ops.gptq_linear(cpu, None, None, None, None, None, 4, 1) == "kernel"
