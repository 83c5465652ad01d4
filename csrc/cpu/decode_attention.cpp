// decode_attention and kv_cache_write on CPU: argument checks, allocation and the
// TORCH_LIBRARY_IMPL block. The attention math is in csrc/cpu/kernels/decode_attention_kernel.cpp
// (one build per CPU capability); the copy of kv_cache_write is gptmod/kv_cache.h's, run here.
// The checks mirror check_decode_attention_args / check_kv_cache_write_args in
// python/gptmod_ext/ops.py (same conditions, same argument names), and the CUDA entry points in
// csrc/cuda/decode_attention.cu call the same functions.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gptmod/decode_attention.h"
#include "gptmod/decode_attention_checks.h"
#include "gptmod/dispatch.h"
#include "gptmod/kv_cache.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(decode_attention_stub, DecodeAttentionFn);

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                double scale, double softcap, int64_t num_splits) {
  check_decode_attention_args(q, k_cache, v_cache, cache_seqlens);
  check_decode_attention_num_splits(num_splits);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S_max = k_cache.size(1), Hkv = k_cache.size(2);
  // Values are cheap to check on the CPU (the CUDA kernel clamps instead): every query must
  // have a position inside the valid rows, and the valid rows inside the cache.
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= Tq && lens[b] <= S_max, "decode_attention: cache_seqlens[", b,
                "] = ", lens[b], " must be in [Tq, S_max] = [", Tq, ", ", S_max, "]");
  }
  auto out = at::empty({B, Tq, Hq, D}, q.options());
  if (out.numel() == 0) return out;

  DecodeAttentionParams p{};
  p.dtype = q.scalar_type();
  p.B = B, p.Tq = Tq, p.Hq = Hq, p.Hkv = Hkv, p.D = D, p.S_max = S_max;
  p.q = q.const_data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_t = q.stride(1), p.q_stride_h = q.stride(2);
  p.k_cache = k_cache.const_data_ptr();
  p.k_stride_b = k_cache.stride(0), p.k_stride_s = k_cache.stride(1), p.k_stride_h = k_cache.stride(2);
  p.v_cache = v_cache.const_data_ptr();
  p.v_stride_b = v_cache.stride(0), p.v_stride_s = v_cache.stride(1), p.v_stride_h = v_cache.stride(2);
  p.cache_seqlens = lens;
  p.out = out.data_ptr();
  p.scale = scale;
  p.softcap = softcap;
  p.num_splits = num_splits;
  decode_attention_stub.get()(p);
  return out;
}

void kv_cache_write_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& k_new, const at::Tensor& v_new,
                        const at::Tensor& cache_seqlens) {
  check_kv_cache_write_args(k_cache, v_cache, k_new, v_new, cache_seqlens);
  const int64_t B = k_new.size(0), Tn = k_new.size(1), Hkv = k_new.size(2), D = k_new.size(3);
  const int64_t S_max = k_cache.size(1);
  const int32_t* lens = cache_seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] + Tn <= S_max, "kv_cache_write: cache_seqlens[", b,
                "] = ", lens[b], " leaves no room for Tn = ", Tn, " new rows in S_max = ", S_max,
                " (need 0 <= cache_seqlens[b] and cache_seqlens[b] + Tn <= S_max)");
  }
  if (B * Tn * Hkv * D == 0) return;
  GPTMOD_DISPATCH_FLOATING_TYPES(k_cache.scalar_type(), "kv_cache_write", [&] {
    auto* kc = k_cache.data_ptr<scalar_t>();
    auto* vc = v_cache.data_ptr<scalar_t>();
    const auto* kn = k_new.const_data_ptr<scalar_t>();
    const auto* vn = v_new.const_data_ptr<scalar_t>();
    // One (b, t) token of Hkv rows per step.
    at::parallel_for(0, B * Tn, std::max<int64_t>(1, 64 / Hkv), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = r % Tn, b = r / Tn, row = lens[b] + t;
        kv_write_heads(kc + b * k_cache.stride(0) + row * k_cache.stride(1), k_cache.stride(2),
                       kn + b * k_new.stride(0) + t * k_new.stride(1), k_new.stride(2), Hkv, D);
        kv_write_heads(vc + b * v_cache.stride(0) + row * v_cache.stride(1), v_cache.stride(2),
                       vn + b * v_new.stride(0) + t * v_new.stride(1), v_new.stride(2), Hkv, D);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("kv_cache_write", &kv_cache_write_cpu);
}

}  // namespace gptmod
