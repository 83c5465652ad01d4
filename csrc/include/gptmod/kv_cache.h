// Appending one token's keys or values to a KV cache on the CPU: the copy behind kv_cache_write
// (csrc/cpu/decode_attention.cpp) and the fused decode step's append (csrc/cpu/kernels/
// decode_step_kernel.cpp), which writes its fp32 activations into a cache of the model's dtype.
// Plain C++ (no vector code: a token's Hkv * D values are a few hundred bytes), so the entry
// points and the per-capability kernel files include it alike.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gptmod {

// dst[h, :D] = src[h, :D] for the Hkv heads of one cache row, converting (rounding to nearest
// even for bf16) when the types differ. Strides in elements; rows have stride 1 along D.
template <typename cache_t, typename src_t>
inline void kv_write_heads(cache_t* __restrict__ dst,      // [Hkv, D], head stride dst_sh
                           int64_t dst_sh,
                           const src_t* __restrict__ src,  // [Hkv, D], head stride src_sh
                           int64_t src_sh, int64_t Hkv, int64_t D) {
  for (int64_t h = 0; h < Hkv; ++h) {
    if constexpr (std::is_same_v<cache_t, src_t>) {
      std::memcpy(dst + h * dst_sh, src + h * src_sh, D * sizeof(cache_t));
    } else {
      for (int64_t d = 0; d < D; ++d) dst[h * dst_sh + d] = static_cast<cache_t>(src[h * src_sh + d]);
    }
  }
}

}  // namespace gptmod
