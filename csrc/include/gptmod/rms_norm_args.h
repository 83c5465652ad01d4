// Argument checks and output allocation of rms_norm, add_rms_norm and rms_norm_backward, shared
// by the CPU entry points (csrc/cpu/rms_norm.cpp) and the CUDA ones (csrc/cuda/rms_norm.cu). The
// messages mirror check_rms_norm_args in python/gptmod_ext/ops.py, so a bad call fails the same
// way eagerly and while tracing with the fake kernels.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "gptmod/rms_norm.h"
#include "gptmod/tensor_checks.h"

namespace gptmod {

// The accumulation dtype of rstd and of the weight inside the kernels: fp32, fp64 for fp64 x.
inline c10::ScalarType rms_acc_dtype(c10::ScalarType x) {
  return x == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// The dtypes out / grad_out may have: x's own, or bf16 / fp16 for an fp32 x (the next matmul's
// autocast dtype, so no separate cast pass).
inline bool rms_out_dtype_ok(c10::ScalarType x, c10::ScalarType out) {
  return out == x || (x == c10::kFloat && (out == c10::kBFloat16 || out == c10::kHalf));
}

inline void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                double eps) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim");
  TORCH_CHECK(is_gptmod_float(x.scalar_type()), op,
              ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [C] = [",
              x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == c10::kFloat, op,
              ": weight must be float32 or x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  check_last_dim_contiguous(op, "x", x);
  check_last_dim_contiguous(op, "weight", weight);
}

inline void check_rms_like_x(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x, bool any_out_dtype) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must be ", x.sizes(), " like x, got ",
              t.sizes());
  const bool ok = any_out_dtype ? rms_out_dtype_ok(x.scalar_type(), t.scalar_type())
                                : t.scalar_type() == x.scalar_type();
  TORCH_CHECK(ok, op, ": ", name, " dtype ", t.scalar_type(), " does not go with x's ",
              x.scalar_type(), any_out_dtype ? " (x's dtype, or bf16/fp16 for a float32 x)" : "");
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  check_last_dim_contiguous(op, name, t);
}

inline c10::ScalarType rms_out_dtype(const char* op, const at::Tensor& x,
                                     std::optional<c10::ScalarType> out_dtype) {
  const c10::ScalarType out = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(rms_out_dtype_ok(x.scalar_type(), out), op, ": out_dtype must be x's dtype ",
              x.scalar_type(), " (or bfloat16 / float16 for a float32 x), got ", out);
  return out;
}

inline void check_rms_norm_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& weight, const at::Tensor& rstd,
                                         const std::optional<at::Tensor>& grad_res) {
  constexpr const char* op = "rms_norm_backward";
  check_rms_norm_args(op, x, weight, 0.0);
  check_rms_like_x(op, "grad_out", grad_out, x, true);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK(rstd.sizes() == lead && rstd.scalar_type() == rms_acc_dtype(x.scalar_type()), op,
              ": rstd must be ", rms_acc_dtype(x.scalar_type()), " ", lead, ", got ",
              rstd.scalar_type(), " ", rstd.sizes());
  TORCH_CHECK(rstd.device() == x.device(), op, ": rstd is on ", rstd.device(), " but x is on ",
              x.device());
  if (grad_res.has_value()) check_rms_like_x(op, "grad_res", *grad_res, x, false);
}

// rstd for x [..., C]: [...] in the accumulation dtype.
inline at::Tensor rms_rstd_empty(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1),
                   x.options().dtype(rms_acc_dtype(x.scalar_type())));
}

}  // namespace gptmod
