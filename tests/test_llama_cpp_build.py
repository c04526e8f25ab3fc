"""Which llama.cpp build eval/bench_cpu.py takes for a CPU class, and how a build's ISA is read
(llmquant/gguf_export/llama_cpp_runner.py); no llama-cpp-python needed."""
from llmquant.gguf_export.llama_cpp_runner import AVX2_BUILD_FOLDER, beyond_avx2, build_folder_for, compiled_features

# llama_print_system_info() of llama-cpp-python 0.3.36 built on an Intel Xeon with AMX: GGML_NATIVE, and
# the AVX2-class flags of scripts/setup_llama_cpp.sh --class avx2
NATIVE_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
               "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
               "OPENMP = 1 | REPACK = 1 | ")
AVX2_INFO = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
             "OPENMP = 1 | REPACK = 1 | ")


def test_compiled_features_are_read_from_the_system_info():
    assert compiled_features(AVX2_INFO) == ["SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE",
                                            "OPENMP", "REPACK"]
    assert "AMX_INT8" in compiled_features(NATIVE_INFO)


def test_only_extensions_beyond_avx2_disqualify_a_build_for_the_avx2_class():
    assert beyond_avx2(compiled_features(AVX2_INFO)) == []
    assert beyond_avx2(compiled_features(NATIVE_INFO)) == ["AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
                                                           "AVX512_BF16", "AMX_INT8"]


def install(folder):
    (folder / "llama_cpp").mkdir(parents=True)
    (folder / "llama_cpp" / "__init__.py").write_text("")
    return folder


def test_the_native_class_takes_the_venvs_own_build(tmp_path):
    install(tmp_path / AVX2_BUILD_FOLDER)
    assert build_folder_for("native", tmp_path, {}) is None


def test_the_avx2_class_takes_the_build_beside_the_venv_or_the_one_named(tmp_path):
    assert build_folder_for("avx2", tmp_path, {}) is None  # none built: no fallback to the native one here
    (tmp_path / AVX2_BUILD_FOLDER).mkdir()
    assert build_folder_for("avx2", tmp_path, {}) is None  # a folder without the package
    beside = install(tmp_path / "venv" / AVX2_BUILD_FOLDER)
    assert build_folder_for("avx2", tmp_path / "venv", {}) == beside
    named = install(tmp_path / "elsewhere")
    assert build_folder_for("avx2", tmp_path / "venv", {"LLMQUANT_LLAMA_CPP_AVX2": str(named)}) == named
