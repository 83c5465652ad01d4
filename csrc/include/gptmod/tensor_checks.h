// Tensor checks shared by the argument checks of every op (gptmod/elementwise_args.h for rope and
// swiglu, gptmod/decode_attention_checks.h for decode_attention and kv_cache_write).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace gptmod {

// The floating dtypes the ops accept: float32, float16, bfloat16, float64.
inline bool is_gptmod_float(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kHalf || t == c10::kBFloat16 || t == c10::kDouble;
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1, op, ": ", name,
              " must have stride 1 in its last dim, got strides ", t.strides());
}

}  // namespace gptmod
