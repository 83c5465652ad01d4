// Argument checks of decode_attention and kv_cache_write, shared by the CPU and CUDA entry
// points. They are the C++ twins of check_decode_attention_args / check_kv_cache_write_args in
// python/gptmod_ext/ops.py (the fake kernels): same conditions, same order, same argument names,
// so a bad call fails the same way eagerly and while tracing. Value checks on cache_seqlens are
// not here: the CPU entry point checks the values, the CUDA kernels clamp them.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "gptmod/tensor_checks.h"

namespace gptmod {

inline void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                        const at::Tensor& v_cache,
                                        const at::Tensor& cache_seqlens) {
  constexpr const char* op = "decode_attention";
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, Tq, Hq, D], got ", q.dim(), "-D");
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be 4-D [B, S_max, Hkv, D], got ",
              k_cache.dim(), "-D");
  TORCH_CHECK(v_cache.dim() == 4, op, ": v_cache must be 4-D [B, S_max, Hkv, D], got ",
              v_cache.dim(), "-D");
  TORCH_CHECK(is_gptmod_float(q.scalar_type()), op,
              ": q must be float32, float16, bfloat16 or float64, got ", q.scalar_type());
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache},
                         {"v_cache", &v_cache}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " dtype ",
                t->scalar_type(), " differs from q's ", q.scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(),
                " but q is on ", q.device());
    check_last_dim_contiguous(op, name, *t);
  }
  check_last_dim_contiguous(op, "q", q);
  const int64_t B = q.size(0), Hq = q.size(2), D = q.size(3);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " differ");
  TORCH_CHECK(k_cache.size(0) == B, op, ": k_cache batch ", k_cache.size(0),
              " differs from q's ", B);
  TORCH_CHECK(k_cache.size(3) == D, op, ": k_cache head dim ", k_cache.size(3),
              " differs from q's ", D);
  const int64_t Hkv = k_cache.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": q heads Hq=", Hq,
              " must be a multiple of the cache's KV heads Hkv=", Hkv);
  TORCH_CHECK(cache_seqlens.scalar_type() == c10::kInt, op, ": cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, op,
              ": cache_seqlens must be [B] = [", B, "], got ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.device() == q.device(), op, ": cache_seqlens is on ",
              cache_seqlens.device(), " but q is on ", q.device());
}

inline void check_decode_attention_num_splits(int64_t num_splits) {
  TORCH_CHECK(num_splits >= 0, "decode_attention: num_splits must be >= 0, got ", num_splits);
}

// What the CUDA kernel adds: no float64, head dims up to 256 (its generic path's bound).
inline void check_decode_attention_cuda_args(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() != c10::kDouble,
              "decode_attention: q float64 is supported on CPU only, not on ", q.device());
  TORCH_CHECK(q.size(3) <= 256, "decode_attention: head dim D must be <= 256 on CUDA, got ",
              q.size(3));
}

inline void check_kv_cache_write_args(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& k_new, const at::Tensor& v_new,
                                      const at::Tensor& cache_seqlens) {
  constexpr const char* op = "kv_cache_write";
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache},
                         {"v_cache", &v_cache},
                         {"k_new", &k_new},
                         {"v_new", &v_new}}) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D, got ", t->dim(), "-D");
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), op, ": ", name, " dtype ",
                t->scalar_type(), " differs from k_cache's ", k_cache.scalar_type());
    TORCH_CHECK(t->device() == k_cache.device(), op, ": ", name, " is on ", t->device(),
                " but k_cache is on ", k_cache.device());
    check_last_dim_contiguous(op, name, *t);
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " differ");
  TORCH_CHECK(k_new.sizes() == v_new.sizes(), op, ": k_new ", k_new.sizes(), " and v_new ",
              v_new.sizes(), " differ");
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_new.size(0) == B && k_new.size(2) == Hkv && k_new.size(3) == D, op,
              ": k_new must be [", B, ", Tn, ", Hkv, ", ", D, "], got ", k_new.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == c10::kInt && cache_seqlens.dim() == 1 &&
                  cache_seqlens.size(0) == B,
              op, ": cache_seqlens must be int32 [", B, "], got ", cache_seqlens.scalar_type(),
              " ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.device() == k_cache.device(), op, ": cache_seqlens is on ",
              cache_seqlens.device(), " but k_cache is on ", k_cache.device());
}

}  // namespace gptmod
