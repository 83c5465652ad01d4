// Argument checks of cross_entropy and cross_entropy_backward, shared by the CPU entry points
// (csrc/cpu/cross_entropy.cpp) and the CUDA ones (csrc/cuda/cross_entropy.cu). The messages
// mirror check_cross_entropy_args in python/gptmod_ext/ops.py (the fake kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "gptmod/cross_entropy.h"
#include "gptmod/tensor_checks.h"

namespace gptmod {

inline c10::ScalarType ce_acc_dtype(c10::ScalarType logits) {
  return logits == c10::kDouble ? c10::kDouble : c10::kFloat;
}

inline void check_cross_entropy_args(const char* op, const at::Tensor& logits,
                                     const at::Tensor& targets, double softcap) {
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op,
              ": logits must be [..., V] with V > 0, got ", logits.sizes());
  TORCH_CHECK(is_gptmod_float(logits.scalar_type()), op,
              ": logits must be float32, float16, bfloat16 or float64, got ",
              logits.scalar_type());
  check_last_dim_contiguous(op, "logits", logits);
  TORCH_CHECK(targets.scalar_type() == c10::kLong, op, ": targets must be int64, got ",
              targets.scalar_type());
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(targets.sizes() == lead, op, ": targets must be ", lead,
              " (logits' leading dims), got ", targets.sizes());
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets is on ", targets.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0 (0 = off), got ", softcap);
}

inline void check_cross_entropy_backward_args(const at::Tensor& grad_loss,
                                              const at::Tensor& logits, const at::Tensor& targets,
                                              const at::Tensor& lse, double softcap) {
  constexpr const char* op = "cross_entropy_backward";
  check_cross_entropy_args(op, logits, targets, softcap);
  TORCH_CHECK(grad_loss.dim() == 0 && is_gptmod_float(grad_loss.scalar_type()), op,
              ": grad_loss must be a 0-d float tensor, got ", grad_loss.scalar_type(), " ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == logits.device(), op, ": grad_loss is on ",
              grad_loss.device(), " but logits is on ", logits.device());
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(lse.sizes() == lead && lse.scalar_type() == ce_acc_dtype(logits.scalar_type()), op,
              ": lse must be ", ce_acc_dtype(logits.scalar_type()), " ", lead, ", got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(lse.device() == logits.device(), op, ": lse is on ", lse.device(),
              " but logits is on ", logits.device());
}

}  // namespace gptmod
