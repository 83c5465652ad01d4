// Argument checks and layout helpers for rope and swiglu, shared by the CPU entry points
// (csrc/cpu/{rope,swiglu}.cpp) and the CUDA ones (csrc/cuda/{rope,swiglu}.cu). The messages
// mirror check_rope_args / check_swiglu_args in python/gptmod_ext/ops.py, so a bad call fails the
// same way eagerly and while tracing with the fake kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "gptmod/rope.h"
#include "gptmod/swiglu.h"
#include "gptmod/tensor_checks.h"

namespace gptmod {

inline void check_rope_args(const char* op, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin, const std::optional<at::Tensor>& positions) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [B, T, H, D], got ", x.dim(), "-D");
  TORCH_CHECK(is_gptmod_float(x.scalar_type()), op,
              ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  const int64_t D = x.size(3);
  TORCH_CHECK(D % 2 == 0, op, ": x head dim D must be even, got ", D);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos},
                                std::pair<const char*, const at::Tensor&>{"sin", sin}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(1) == D / 2, op, ": ", name,
                " must be [max_pos, D/2] = [*, ", D / 2, "], got ", t.sizes());
    const bool dtype_ok = t.scalar_type() == at::kFloat ||
                          (x.scalar_type() == at::kDouble && t.scalar_type() == at::kDouble);
    TORCH_CHECK(dtype_ok, op, ": ", name, " must be float32 (or float64 with float64 x), got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
                " but x is on ", x.device());
    check_last_dim_contiguous(op, name, t);
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), op, ": cos ", cos.sizes(), " and sin ", sin.sizes(),
              " differ");
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), op, ": cos (", cos.scalar_type(),
              ") and sin (", sin.scalar_type(), ") dtypes differ");
  check_last_dim_contiguous(op, "x", x);
  if (!positions.has_value()) {
    TORCH_CHECK(x.size(1) <= cos.size(0), op, ": x has T=", x.size(1),
                " tokens but cos/sin only cover ", cos.size(0), " positions");
    return;
  }
  const at::Tensor& p = *positions;
  TORCH_CHECK(p.scalar_type() == at::kInt || p.scalar_type() == at::kLong, op,
              ": positions must be int32 or int64, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), op, ": positions is on ", p.device(), " but x is on ",
              x.device());
  const bool shape_ok = (p.dim() == 1 && p.size(0) == x.size(1)) ||
                        (p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(1));
  TORCH_CHECK(shape_ok, op, ": positions must be [T] or [B, T] = [", x.size(0), ", ", x.size(1),
              "], got ", p.sizes());
}

// Fills everything of RopeParams but the data pointers of x/out and the tables.
inline RopeParams rope_params(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos,
                              const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                              bool interleaved, bool inverse) {
  RopeParams p{};
  p.dtype = x.scalar_type();
  p.B = x.size(0);
  p.T = x.size(1);
  p.H = x.size(2);
  p.D = x.size(3);
  p.x = x.const_data_ptr();
  p.x_sb = x.stride(0);
  p.x_st = x.stride(1);
  p.x_sh = x.stride(2);
  p.out = out.data_ptr();
  p.out_sb = out.stride(0);
  p.out_st = out.stride(1);
  p.out_sh = out.stride(2);
  p.cos = cos.const_data_ptr();
  p.sin = sin.const_data_ptr();
  p.cos_stride = cos.stride(0);
  p.sin_stride = sin.stride(0);
  p.max_pos = cos.size(0);
  if (positions.has_value()) {
    const at::Tensor& pos = *positions;
    p.positions = pos.const_data_ptr();
    p.positions_int64 = pos.scalar_type() == at::kLong;
    p.pos_sb = pos.dim() == 2 ? pos.stride(0) : 0;
    p.pos_st = pos.stride(pos.dim() - 1);
  }
  p.interleaved = interleaved;
  p.inverse = inverse;
  return p;
}

inline void check_swiglu_args(const char* op, const at::Tensor& gate_up,
                              const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(gate_up.dim() >= 1, op, ": gate_up must have at least 1 dim");
  TORCH_CHECK(is_gptmod_float(gate_up.scalar_type()), op,
              ": gate_up must be float32, float16, bfloat16 or float64, got ",
              gate_up.scalar_type());
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, op, ": gate_up last dim must be even (2F), got ",
              gate_up.size(-1));
  check_last_dim_contiguous(op, "gate_up", gate_up);
  if (grad_out == nullptr) return;
  auto want_vec = gate_up.sizes().vec();
  want_vec.back() /= 2;
  const c10::IntArrayRef want(want_vec);
  TORCH_CHECK(grad_out->sizes() == want, op, ": grad_out must be ", want, ", got ",
              grad_out->sizes());
  TORCH_CHECK(grad_out->scalar_type() == gate_up.scalar_type(), op, ": grad_out dtype ",
              grad_out->scalar_type(), " differs from gate_up's ", gate_up.scalar_type());
  TORCH_CHECK(grad_out->device() == gate_up.device(), op, ": grad_out is on ",
              grad_out->device(), " but gate_up is on ", gate_up.device());
  check_last_dim_contiguous(op, "grad_out", *grad_out);
}

// swiglu's output for gate_up [..., 2F]: an uninitialised [..., F] tensor like gate_up.
inline at::Tensor swiglu_empty_out(const at::Tensor& gate_up) {
  auto sizes = gate_up.sizes().vec();
  sizes.back() = gate_up.size(-1) / 2;
  return at::empty(sizes, gate_up.options());
}

// Collapses the leading dims of t (all but the last) into at most two strided row dims. Returns
// false when three or more remain (a fully general view): the caller then makes t contiguous.
inline bool row_layout(const at::Tensor& t, RowLayout& out) {
  // (size, stride) of the leading dims, size-1 dims dropped, merged where contiguous in memory.
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d)) {
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    } else {
      dims.emplace_back(t.size(d), t.stride(d));
    }
  }
  out = RowLayout{};
  if (dims.empty()) return true;
  if (dims.size() == 1) {
    out.outer_stride = dims[0].second;
    return true;
  }
  if (dims.size() == 2) {
    out.inner = dims[1].first;
    out.outer_stride = dims[0].second;
    out.inner_stride = dims[1].second;
    return true;
  }
  return false;
}

// t itself when its leading dims collapse to two strided row dims (no copy for row-strided
// 2-D/3-D views), else a contiguous copy; fills its row layout.
inline at::Tensor with_row_layout(const at::Tensor& t, RowLayout& rows) {
  if (row_layout(t, rows)) return t;
  at::Tensor c = t.contiguous();
  TORCH_INTERNAL_ASSERT(row_layout(c, rows));
  return c;
}

}  // namespace gptmod
