"""Our GGUF files opened by llama.cpp itself (llama-cpp-python, an optional install:
scripts/setup_llama_cpp.sh), for the interop tests and eval/bench_cpu.py.

On CPUs with AMX, llama.cpp (as built by llama-cpp-python 0.3.36 with GGML_NATIVE) moves q4_0 / q8_0
weights into its AMX buffer type, and its AMX matmul then crashes the process (SIGSEGV in
ggml_backend_amx_mul_mat on a 2-core Xeon with amx_int8, for every type we export; SIGILL at the first
evaluation, after the AMX repack, on another 2-core Xeon with AMX, q4_0 and q8_0). Where the loaded
build has AMX and the CPU too, the extra buffer types are switched off (use_extra_bufts = false: no AMX
and no CPU repacking either), which is what llama.cpp's `--no-repack` does; elsewhere (a build without
AMX, such as the AVX2-class one) llama.cpp keeps its defaults.

Two builds can sit side by side (scripts/setup_llama_cpp.sh): the native one in the venv itself, and
an AVX2-class one (no AVX-512, VNNI, AMX) in a folder of its own, for measuring against torch forced to
the AVX2 class on a bigger CPU.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

# scripts/setup_llama_cpp.sh --class avx2 installs there, under the venv (not on its sys.path, so the
# native build stays the one `import llama_cpp` finds); LLMQUANT_LLAMA_CPP_AVX2 names another folder
AVX2_BUILD_FOLDER = "llama-cpp-avx2"
# llama.cpp's names (llama_print_system_info) for the x86 extensions an AVX2-class CPU lacks
BEYOND_AVX2 = ("AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8")


def build_folder_for(cpu_class: str, venv: Path, environ=os.environ) -> Path | None:
    """The folder to import llama_cpp from for a CPU class ("native" or "avx2"): None for the native
    class (the venv's own install), the AVX2-class build's folder for "avx2" (None where it is not there:
    there is no AVX2-class llama.cpp)."""
    if cpu_class == "native":
        return None
    folder = Path(environ.get("LLMQUANT_LLAMA_CPP_AVX2") or Path(venv) / AVX2_BUILD_FOLDER)
    return folder if (folder / "llama_cpp" / "__init__.py").is_file() else None


def compiled_features(system_info: str) -> list[str]:
    """The features llama.cpp's CPU backend was compiled with, from llama_print_system_info()
    ("CPU : SSE3 = 1 | AVX = 1 | ... | REPACK = 1 | "): the compiler's target, not the CPU's."""
    return re.findall(r"([A-Z][A-Z0-9_]*) = 1\b", system_info)


def beyond_avx2(features) -> list[str]:
    return [name for name in features if name in BEYOND_AVX2]


@lru_cache
def loaded_build_features() -> tuple[str, ...]:
    import llama_cpp

    return tuple(compiled_features(llama_cpp.llama_print_system_info().decode()))


def describe_build() -> str:
    """The imported llama.cpp's SIMD target, e.g. "built for AVX, AVX2, FMA, F16C, BMI2"."""
    simd = [name for name in loaded_build_features()
            if name.startswith(("AVX", "AMX", "FMA", "F16C", "BMI2", "NEON", "SVE", "DOTPROD", "MATMUL_INT8"))]
    return "built for " + (", ".join(simd) or "no SIMD extension")


@lru_cache
def cpu_has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def amx_would_run() -> bool:
    return cpu_has_amx() and "AMX_INT8" in loaded_build_features()


def open_in_llama_cpp(path, **options):
    """A llama_cpp.Llama on `path` (verbose off unless asked), with the AMX workaround above."""
    import llama_cpp
    from llama_cpp import llama_cpp as bindings  # where Llama() reads its model defaults

    options = {"verbose": False, **options}
    if not amx_would_run():
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
    return "extra buffer types off (AMX crash workaround)" if amx_would_run() else "llama.cpp defaults"
