"""Our GGUF files opened by llama.cpp itself (llama-cpp-python, an optional install:
scripts/setup_llama_cpp.sh), for the interop tests and eval/bench_cpu.py.

On CPUs with AMX, llama.cpp (as built by llama-cpp-python 0.3.36 with GGML_NATIVE) moves q4_0 / q8_0
weights into its AMX buffer type, and its AMX matmul then crashes the process (SIGSEGV in
ggml_backend_amx_mul_mat on a 2-core Xeon with amx_int8, for every type we export). There the extra
buffer types are switched off (use_extra_bufts = false: no AMX and no CPU repacking either), which is
what llama.cpp's `--no-repack` does; elsewhere llama.cpp keeps its defaults.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache
def cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def open_in_llama_cpp(path, **options):
    """A llama_cpp.Llama on `path` (verbose off unless asked), with the AMX workaround above."""
    import llama_cpp
    from llama_cpp import llama_cpp as bindings  # where Llama() reads its model defaults

    options = {"verbose": False, **options}
    if not cpu_has_amx():
        return llama_cpp.Llama(model_path=str(path), **options)
    default_params = bindings.llama_model_default_params

    def without_extra_buffer_types():
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffer_types
    try:
        return llama_cpp.Llama(model_path=str(path), **options)
    finally:
        bindings.llama_model_default_params = default_params


def extra_buffer_types_note() -> str:
    return "extra buffer types off (AMX crash workaround)" if cpu_has_amx() else "llama.cpp defaults"
