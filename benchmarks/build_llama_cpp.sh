#!/usr/bin/env bash
# Builds llama.cpp's llama-tokenize, llama-simple and llama-bench for the GGUF tests and the
# decode benchmark, from the llama.cpp that the llama-cpp-python sdist on PyPI vendors (PyPI is
# reachable where GitHub may not be). llama.cpp is not a dependency of gptmod_ext.
#
#   benchmarks/build_llama_cpp.sh [PREFIX]     # default ~/.cache/gptmod_ext/llama.cpp
#
# The binaries land in PREFIX/bin; the last line printed is that directory. Idempotent: a second
# run with the same version, CPU flags and tools finds PREFIX/build-info.txt and returns at once
# (about 10 minutes on 2 cores otherwise). The sdist, its sources and the CMake build stay in
# ~/.cache/gptmod_ext/llama.cpp-src, so a changed flag or tool rebuilds only what it touches.
# Environment: PYTHON (the pip that downloads the sdist; default python3),
# LLAMA_CPP_PYTHON_VERSION (default below), CMAKE_BUILD_PARALLEL_LEVEL.
#
# llama-simple, not llama-completion, gives the tests llama.cpp's greedy text: in this release
# llama-completion prints through an asynchronous logger that can lose the end of its output at
# exit (llama.cpp issue 22142); llama-simple prints each token with printf and fflush.
#
# Why the flags: GGML_NATIVE=OFF, so the build does not take the compiler's -march=native
# (cpuid can report AMX in a VM that faults on it), and each ISA option is ON only where
# /proc/cpuinfo lists the instruction set; AMX is always off. GGML_AVX_VNNI is the 256-bit
# AVX-VNNI (a Zen 4 EPYC has AVX512-VNNI but not it; turned on there, Q8_0 dies with SIGILL).
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PREFIX=${1:-$HOME/.cache/gptmod_ext/llama.cpp}
PY=${PYTHON:-python3}
TOOLS=(llama-tokenize llama-simple llama-bench)

flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
isa=()
# cpuinfo flag -> ggml option
for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI \
            avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
            avx512_bf16:AVX512_BF16; do
  on=OFF
  [[ "$flags" == *" ${pair%%:*} "* ]] && on=ON
  isa+=("-DGGML_${pair#*:}=$on")
done
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF "${isa[@]}"
             -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
             -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON
             -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF)
STAMP="llama-cpp-python $VERSION; ${TOOLS[*]}; cmake ${CMAKE_FLAGS[*]}"

have_all() { for t in "${TOOLS[@]}"; do [ -x "$PREFIX/bin/$t" ] || return 1; done; }
if have_all && [ "$(cat "$PREFIX/build-info.txt" 2>/dev/null)" == "$STAMP" ]; then
  echo "$PREFIX/bin"
  exit 0
fi

CACHE=$HOME/.cache/gptmod_ext/llama.cpp-src
mkdir -p "$CACHE"
echo "build_llama_cpp: llama-cpp-python==$VERSION sdist -> $PREFIX/bin (${isa[*]})" >&2
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
SRC=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  if [ ! -f "$SDIST" ]; then
    DL=$(mktemp -d "$CACHE/.download.XXXXXX")
    "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" \
      -d "$DL" >&2
    mv "$DL/$(basename "$SDIST")" "$SDIST"
    rm -rf "$DL"
  fi
  X=$(mktemp -d "$CACHE/.extract.XXXXXX")  # whole or not at all
  tar -xzf "$SDIST" -C "$X"
  rm -rf "$CACHE/llama_cpp_python-$VERSION"
  mv "$X/llama_cpp_python-$VERSION" "$CACHE/"
  rm -rf "$X"
fi
BUILD=$CACHE/build-$VERSION
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
[ -f "$BUILD/CMakeCache.txt" ] && GEN=()  # the generator of an existing build stays
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" "${CMAKE_FLAGS[@]}" >&2
cmake --build "$BUILD" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" --target "${TOOLS[@]}" >&2

# Installed whole or not at all: a stale build-info never describes new binaries.
rm -rf "$PREFIX.tmp"
mkdir -p "$PREFIX.tmp/bin"
for t in "${TOOLS[@]}"; do cp "$BUILD/bin/$t" "$PREFIX.tmp/bin/"; done
echo "$STAMP" > "$PREFIX.tmp/build-info.txt"
rm -rf "$PREFIX"
mv "$PREFIX.tmp" "$PREFIX"
echo "$PREFIX/bin"
