// Parameters and scalar math shared by the rms_norm entry points (csrc/cpu/rms_norm.cpp,
// csrc/cuda/rms_norm.cu) and the per-capability CPU kernels (csrc/cpu/kernels/rms_norm_kernel.cpp).
// Light on purpose: kernel files are compiled three times.
//
// Forward, per row of x [rows, C] (or of s = x + residual for add_rms_norm):
//   rstd = 1 / sqrt(mean(s^2) + eps),  out = s * rstd * weight.
// Backward, with g = grad_out * weight:
//   dx = rstd * g - s * rstd^3 * sum(g * s) / C  (+ grad_res, the residual stream's own gradient),
//   dweight = sum over rows of grad_out * s * rstd.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"
#include "gptmod/elementwise_math.h"
#include "gptmod/macros.h"
#include "gptmod/row_layout.h"

namespace gptmod {

struct RmsNormParams {
  c10::ScalarType x_dtype;    // x, residual and sum
  c10::ScalarType out_dtype;  // out: x's dtype, or bf16/fp16 for an fp32 x (autocast)
  int64_t rows;
  int64_t C;
  double eps;
  const void* x;         // [rows, C] laid out by x_rows
  RowLayout x_rows;
  const void* residual;  // add_rms_norm: [rows, C] by res_rows, x's dtype; else nullptr
  RowLayout res_rows;
  const void* weight;    // [C] contiguous, in the accumulation type (fp32; fp64 for fp64 x)
  void* out;             // [rows, C] contiguous, out_dtype
  void* sum;             // add_rms_norm: x + residual [rows, C] contiguous, x's dtype; else nullptr
  void* rstd;            // [rows] contiguous, accumulation type
};

struct RmsNormBwdParams {
  c10::ScalarType x_dtype;    // x, grad_res and dx
  c10::ScalarType out_dtype;  // grad_out (the forward's out dtype)
  int64_t rows;
  int64_t C;
  const void* grad_out;  // [rows, C] by go_rows
  RowLayout go_rows;
  const void* x;         // [rows, C] by x_rows: the normalized input (s for add_rms_norm)
  RowLayout x_rows;
  const void* weight;    // [C] contiguous, accumulation type
  const void* rstd;      // [rows] contiguous, accumulation type
  const void* grad_res;  // [rows, C] by gr_rows, x's dtype, added to dx; or nullptr
  RowLayout gr_rows;
  void* dx;              // [rows, C] contiguous, x's dtype
  void* dw_partial;      // [blocks, C] accumulation type: one row of sums per block of rows
  int64_t blocks;
};

// Row blocks of the weight gradient's partial sums: a fixed count, so the sum (and a resumed
// run) does not depend on the number of threads.
constexpr int64_t kRmsNormBwdBlocks = 32;

template <typename acc_t>
GPTMOD_HD acc_t rms_rstd(acc_t sum_sq, int64_t C, double eps) {
  return acc_t(1) / gptmod_sqrt(sum_sq / acc_t(C) + acc_t(eps));
}

using RmsNormFn = void (*)(const RmsNormParams&);
using RmsNormBwdFn = void (*)(const RmsNormBwdParams&);
GPTMOD_DECLARE_STUB(rms_norm_fwd_stub, RmsNormFn);
GPTMOD_DECLARE_STUB(rms_norm_bwd_stub, RmsNormBwdFn);

}  // namespace gptmod
