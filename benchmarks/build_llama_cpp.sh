#!/usr/bin/env bash
# Builds llama.cpp's llama-tokenize, llama-completion and llama-bench for the GGUF tests and the
# decode benchmark, from the llama.cpp that the llama-cpp-python sdist on PyPI vendors (PyPI is
# reachable where GitHub may not be). llama.cpp is not a dependency of gptmod_ext.
#
#   benchmarks/build_llama_cpp.sh [PREFIX]     # default ~/.cache/gptmod_ext/llama.cpp
#
# The binaries land in PREFIX/bin; the last line printed is that directory. Idempotent: a second
# run with the same version and CPU flags finds PREFIX/build-info.txt and returns at once
# (about 10 minutes on 2 cores otherwise). Environment: PYTHON (the pip that downloads the sdist;
# default python3), LLAMA_CPP_PYTHON_VERSION (default below), CMAKE_BUILD_PARALLEL_LEVEL.
#
# Why the flags: GGML_NATIVE=OFF, so the build does not take the compiler's -march=native
# (cpuid can report AMX in a VM that faults on it), and each ISA option is ON only where
# /proc/cpuinfo lists the instruction set; AMX is always off. GGML_AVX_VNNI is the 256-bit
# AVX-VNNI (a Zen 4 EPYC has AVX512-VNNI but not it; turned on there, Q8_0 dies with SIGILL).
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PREFIX=${1:-$HOME/.cache/gptmod_ext/llama.cpp}
PY=${PYTHON:-python3}
TOOLS=(llama-tokenize llama-completion llama-bench)

flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
isa=()
# cpuinfo flag -> ggml option
for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI \
            avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
  if [[ "$flags" == *" ${pair%%:*} "* ]]; then isa+=("-DGGML_${pair#*:}=ON"); else isa+=("-DGGML_${pair#*:}=OFF"); fi
done
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${isa[@]}"
             -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
             -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
             -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF)
STAMP="llama-cpp-python $VERSION; cmake ${CMAKE_FLAGS[*]}"

have_all() { for t in "${TOOLS[@]}"; do [ -x "$PREFIX/bin/$t" ] || return 1; done; }
if have_all && [ "$(cat "$PREFIX/build-info.txt" 2>/dev/null)" == "$STAMP" ]; then
  echo "$PREFIX/bin"
  exit 0
fi

CACHE=$HOME/.cache/gptmod_ext
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.llama-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "build_llama_cpp: llama-cpp-python==$VERSION sdist -> $PREFIX/bin (${isa[*]})" >&2
SDIST=$(ls "$CACHE"/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK/dl" >&2
  mv "$WORK"/dl/llama_cpp_python-"$VERSION".tar.gz "$CACHE/"
  SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
fi
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" "${CMAKE_FLAGS[@]}" >&2
cmake --build "$WORK/build" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" --target "${TOOLS[@]}" >&2

# Installed whole or not at all: a stale build-info never describes new binaries.
rm -rf "$PREFIX.tmp"
mkdir -p "$PREFIX.tmp/bin"
for t in "${TOOLS[@]}"; do cp "$WORK/build/bin/$t" "$PREFIX.tmp/bin/"; done
echo "$STAMP" > "$PREFIX.tmp/build-info.txt"
rm -rf "$PREFIX"
mv "$PREFIX.tmp" "$PREFIX"
echo "$PREFIX/bin"
