// Small helpers shared by the CUDA kernel files (csrc/cuda/*.cu).
#pragma once

#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "gptmod/acc_type.h"

namespace gptmod::cuda {

// Elements per 16-byte access.
template <typename T>
constexpr int kPack16 = 16 / sizeof(T) > 0 ? int(16 / sizeof(T)) : 1;

using gptmod::AccType;
using gptmod::acc_t;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks for a grid-stride loop over n items: enough to fill any current GPU several times
// over, few enough that a launch never exceeds the grid limit; the loop covers the rest.
inline unsigned int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > 65535 * 4 ? 65535 * 4 : blocks));
}

// ---------------------------------------------------------------------------------------------
// 16-byte accesses converted in registers.
//
// A 16-byte chunk is loaded as one uint4 (LDG.128 / LDS.128) and split into elements with shifts
// on that register copy. Going through a struct of c10::Half / c10::BFloat16 (or a reference to
// the chunk in shared memory) instead let nvcc split the access into 16- or 32-bit pieces
// (8 x LDS.U16 per bf16 chunk, 4 x STG.E per store); benchmarks/cuda_sass_check.py checks the
// compiled library for that. Conversions are the c10 types' own, so results equal
// static_cast<float>(x) and static_cast<T>(f) bit for bit.

template <typename T>
__device__ __forceinline__ acc_t<T> element_from_bits(uint32_t lo, uint32_t hi_word);

template <>
__device__ __forceinline__ float element_from_bits<c10::Half>(uint32_t b, uint32_t) {
  return static_cast<float>(c10::Half(static_cast<uint16_t>(b), c10::Half::from_bits()));
}
template <>
__device__ __forceinline__ float element_from_bits<c10::BFloat16>(uint32_t b, uint32_t) {
  return __uint_as_float(b << 16);  // bf16 is the top half of an fp32: exact
}
template <>
__device__ __forceinline__ float element_from_bits<float>(uint32_t b, uint32_t) {
  return __uint_as_float(b);
}
template <>
__device__ __forceinline__ double element_from_bits<double>(uint32_t lo, uint32_t hi) {
  return __hiloint2double(int(hi), int(lo));
}

// The bits of static_cast<T>(v): 16 bits for half types, 32 for float, 64 (as two words) for
// double.
__device__ __forceinline__ uint32_t element_bits(c10::Half, float v) { return c10::Half(v).x; }
__device__ __forceinline__ uint32_t element_bits(c10::BFloat16, float v) { return c10::BFloat16(v).x; }
__device__ __forceinline__ uint32_t element_bits(float, float v) { return __float_as_uint(v); }

// uint4 (4 words) -> 16 / sizeof(T) values in the accumulation type.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4 u, acc_t<T> (&f)[16 / sizeof(T)]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = element_from_bits<T>((w[e / 2] >> (16 * (e % 2))) & 0xffffu, 0);
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < 4; ++e) f[e] = element_from_bits<T>(w[e], 0);
  } else {
#pragma unroll
    for (int e = 0; e < 2; ++e) f[e] = element_from_bits<T>(w[2 * e], w[2 * e + 1]);
  }
}

// 16 / sizeof(T) values -> the uint4 of their T representations.
template <typename T>
__device__ __forceinline__ uint4 pack16(const acc_t<T> (&f)[16 / sizeof(T)]) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = element_bits(T(), f[2 * k]) | (element_bits(T(), f[2 * k + 1]) << 16);
  } else if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = element_bits(T(), f[k]);
  } else {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      w[2 * e] = uint32_t(__double2loint(f[e]));
      w[2 * e + 1] = uint32_t(__double2hiint(f[e]));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// N elements at p (global or shared memory) -> f. N a multiple of 16 / sizeof(T): 16-byte loads,
// p must be 16-byte aligned; otherwise element loads.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T> (&f)[N]) {
  constexpr int K = 16 / int(sizeof(T));
  if constexpr (N % K == 0) {
#pragma unroll
    for (int c = 0; c < N / K; ++c) {
      acc_t<T> g[K];
      unpack16<T>(*reinterpret_cast<const uint4*>(p + c * K), g);
#pragma unroll
      for (int e = 0; e < K; ++e) f[c * K + e] = g[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = static_cast<acc_t<T>>(p[e]);
  }
}

// f -> N elements at p, in global memory; the same access rule as load_vec. The 16-byte store
// goes through __stwb (st.global.wb.v4, the default write-back policy): a plain uint4
// assignment was split by nvcc into 4 x STG.E.32 in rope's half-split instances.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T> (&f)[N]) {
  constexpr int K = 16 / int(sizeof(T));
  if constexpr (N % K == 0) {
#pragma unroll
    for (int c = 0; c < N / K; ++c) {
      acc_t<T> g[K];
#pragma unroll
      for (int e = 0; e < K; ++e) g[e] = f[c * K + e];
      __stwb(reinterpret_cast<uint4*>(p + c * K), pack16<T>(g));
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) p[e] = static_cast<T>(f[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// Architectures. GPTMOD_CUDA_ARCHS is CMAKE_CUDA_ARCHITECTURES, comma-separated (CMakeLists.txt).
#ifndef GPTMOD_CUDA_ARCHS
#define GPTMOD_CUDA_ARCHS "unknown"
#endif

// Internal linkage on purpose: each kernel file gets its own probe kernel and its own cache.
namespace {

__global__ void arch_probe_kernel() {}

// Raises a clear error, once per device, when this library holds no kernel image the current
// device can run (instead of "no kernel image is available" at the first launch). Call it after
// the device guard. cudaFuncGetAttributes asks the driver whether a SASS or PTX image fits, so
// PTX JIT for newer GPUs counts as fitting.
void check_device_arch(int device) {
  static int8_t fits[64] = {};  // racing first calls both check: harmless
  if (device >= 0 && device < 64 && fits[device]) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, arch_probe_kernel);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // not a sticky error: clear it so later calls start clean
    cudaDeviceProp prop;
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    TORCH_CHECK(false, "gptmod_ext: the CUDA kernels were built for sm ", GPTMOD_CUDA_ARCHS,
                " but cuda:", device, " (", prop.name, ") is sm_", prop.major, prop.minor,
                "; rebuild for it: pip install --no-build-isolation --no-deps . "
                "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=\"", prop.major, prop.minor, "\"");
  }
  C10_CUDA_CHECK(err);
  if (device >= 0 && device < 64) fits[device] = 1;
}

}  // namespace

}  // namespace gptmod::cuda

namespace gptmod::cuda {

// The reduction of v over a 1-D block (blockDim.x a multiple of 32, at most 1024) by op, in a
// fixed order (warp shuffles, then the warps' results in warp order): every thread gets it.
// scratch: 32 elements of shared memory; the leading __syncthreads lets a kernel call this
// several times with the same scratch.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T out = scratch[0];
  for (int w = 1; w < warps; ++w) out = op(out, scratch[w]);
  return out;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

}  // namespace gptmod::cuda
