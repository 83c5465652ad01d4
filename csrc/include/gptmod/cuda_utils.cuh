// Small helpers shared by the CUDA kernel files (csrc/cuda/*.cu).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "gptmod/acc_type.h"

namespace gptmod::cuda {

// N elements moved as one aligned access (16 bytes when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

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

}  // namespace gptmod::cuda
