#!/usr/bin/env bash
# Install llama-cpp-python 0.3.36 into llmquant's venv (default .venv; LLMQUANT_VENV overrides), for
# the GGUF part of the interop suite and as the outside reference of eval/bench_cpu.py. Not part of
# setup.sh: nothing else needs it. LLAMA_CPP_WHEEL=path/to.whl installs a wheel built before;
# otherwise pip builds PyPI's sdist with CMake for this CPU (GGML_NATIVE): about 10-20 minutes on
# 2 cores the first time, seconds later (pip caches the built wheel). An installed 0.3.36 is left as it is.
#
# --class avx2 builds a second one for the AVX2 class (GGML_NATIVE off: AVX, AVX2, FMA, F16C, BMI2; no
# AVX-512, VNNI or AMX) into $VENV/llama-cpp-avx2, beside the native one rather than over it: the venv
# keeps importing the native build, and eval/bench_cpu.py --class avx2 (torch forced to the AVX2 class
# on a bigger CPU) imports this one, so both sides of its table run on the same class of CPU.
# LLAMA_CPP_WHEEL then names a wheel built with those flags.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU_CLASS=native
case "${1:-}" in
  "") ;;
  --class) CPU_CLASS="${2:-}" ;;
  *) echo "usage: $0 [--class native|avx2]" >&2; exit 2 ;;
esac
VENV="${LLMQUANT_VENV:-.venv}"
AVX2_FOLDER="$VENV/llama-cpp-avx2"  # where eval/bench_cpu.py looks (llama_cpp_runner.AVX2_BUILD_FOLDER)
CMAKE_FLAGS=(-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF)
case "$CPU_CLASS" in
  native)
    CMAKE_FLAGS+=(-DGGML_NATIVE=ON)
    INSTALL_INTO=() ;;
  avx2)
    # each extension named: GGML_NATIVE=OFF alone leaves the x86 defaults (AVX2 and below) on, but a
    # later llama.cpp could turn more on by default, and this build must stay AVX2-class
    CMAKE_FLAGS+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                  -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
                  -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
    INSTALL_INTO=(--target "$AVX2_FOLDER" --upgrade) ;;
  *) echo "--class: native or avx2, not '$CPU_CLASS'" >&2; exit 2 ;;
esac
bash scripts/setup.sh
PY="$VENV/bin/python"
VERSION=0.3.36
if [ "$CPU_CLASS" = native ]; then
  INSTALLED=$("$PY" -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null || true)
else
  # not `import llama_cpp` with the folder on the path: where the folder has none, that finds the
  # venv's native build
  INSTALLED=$(ls -d "$AVX2_FOLDER"/llama_cpp_python-*.dist-info 2>/dev/null | sed 's/.*llama_cpp_python-\(.*\)\.dist-info/\1/' || true)
fi
if [ "$INSTALLED" = "$VERSION" ]; then
  echo "llama-cpp-python $VERSION ($CPU_CLASS class) already installed"
  exit 0
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check -c scripts/constraints.txt)
# its runtime dependencies (none of them pulls torch), in the venv for both builds
"${PIP[@]}" "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
if [ -n "${LLAMA_CPP_WHEEL:-}" ]; then
  "${PIP[@]}" --no-deps "${INSTALL_INTO[@]}" "$LLAMA_CPP_WHEEL"
else
  # pip's wheel cache keys a wheel by the sdist, not by CMAKE_ARGS: the AVX2 build neither takes the
  # native wheel from it nor leaves its own there for a later native install
  NO_CACHE=()
  [ "$CPU_CLASS" = avx2 ] && NO_CACHE=(--no-cache-dir)
  CMAKE_ARGS="${CMAKE_FLAGS[*]}" \
    "${PIP[@]}" --no-deps "${NO_CACHE[@]}" "${INSTALL_INTO[@]}" --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
fi
