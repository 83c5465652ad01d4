// Parameters shared by the decode_attention / kv_cache_write entry points (csrc/cpu/
// decode_attention.cpp) and the per-capability CPU kernel (csrc/cpu/kernels/
// decode_attention_kernel.cpp), which the fused decode step calls too (its one attention).
// Light on purpose: the kernel file is compiled three times.
#pragma once
#include <cstdint>
#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"
#include "gptmod/decode_attention_common.h"

namespace gptmod {

// All strides are in elements. The caches are read only at rows < cache_seqlens[b]; the entry
// point has checked Tq <= cache_seqlens[b] <= S_max for every b.
struct DecodeAttentionParams {
  c10::ScalarType dtype;  // of q, caches and out (float32, float16, bfloat16 or float64)
  int64_t B, Tq, Hq, Hkv, D, S_max;

  const void* q;  // [B, Tq, Hq, D], strided (last dim stride 1)
  int64_t q_stride_b, q_stride_t, q_stride_h;
  const void* k_cache;  // [B, S_max, Hkv, D], strided (last dim stride 1)
  int64_t k_stride_b, k_stride_s, k_stride_h;
  const void* v_cache;  // [B, S_max, Hkv, D], strided (last dim stride 1)
  int64_t v_stride_b, v_stride_s, v_stride_h;
  const int32_t* cache_seqlens;  // [B]
  void* out;                     // [B, Tq, Hq, D], contiguous

  double scale;    // applied to q.k before the softcap (double: exact for fp64 inputs)
  double softcap;  // 0 = off
  int64_t num_splits;  // 0 = heuristic (decode_attention_cpu_num_splits), > 0 forced
  // q and out are float32 whatever `dtype` the caches are: the fused decode step's fp32
  // activations over its bf16 cache (csrc/cpu/kernels/decode_step_kernel.cpp). CPU only.
  bool fp32_io = false;
};

using DecodeAttentionFn = void (*)(const DecodeAttentionParams&);
GPTMOD_DECLARE_STUB(decode_attention_stub, DecodeAttentionFn);

}  // namespace gptmod
