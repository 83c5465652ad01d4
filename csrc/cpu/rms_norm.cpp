// rms_norm / add_rms_norm / rms_norm_backward on CPU: argument checks, output allocation, and a
// call into the widest CPU build of the kernels (csrc/cpu/kernels/rms_norm_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gptmod/elementwise_args.h"
#include "gptmod/rms_norm_args.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(rms_norm_fwd_stub, RmsNormFn);
GPTMOD_DEFINE_STUB(rms_norm_bwd_stub, RmsNormBwdFn);

namespace {

// Runs the forward; residual undefined for plain rms_norm. Returns (out, sum or undefined, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward(
    const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight, double eps,
    c10::ScalarType out_dtype) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor sum = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor rstd = rms_rstd_empty(x);
  if (out.numel() == 0) return {out, sum, rstd.fill_(0)};
  RmsNormParams p{};
  const at::Tensor xr = with_row_layout(x, p.x_rows);
  at::Tensor rr;
  if (residual) {
    rr = with_row_layout(*residual, p.res_rows);
    p.residual = rr.const_data_ptr();
    p.sum = sum.data_ptr();
  }
  const at::Tensor w = weight.to(rms_acc_dtype(x.scalar_type())).contiguous();
  p.x_dtype = x.scalar_type();
  p.out_dtype = out_dtype;
  p.C = x.size(-1);
  p.rows = x.numel() / p.C;
  p.eps = eps;
  p.x = xr.const_data_ptr();
  p.weight = w.const_data_ptr();
  p.out = out.data_ptr();
  p.rstd = rstd.data_ptr();
  rms_norm_fwd_stub.get()(p);
  return {out, sum, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps,
                                                std::optional<c10::ScalarType> out_dtype) {
  check_rms_norm_args("rms_norm", x, weight, eps);
  auto [out, sum, rstd] =
      rms_norm_forward(x, nullptr, weight, eps, rms_out_dtype("rms_norm", x, out_dtype));
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
    std::optional<c10::ScalarType> out_dtype) {
  check_rms_norm_args("add_rms_norm", x, weight, eps);
  check_rms_like_x("add_rms_norm", "residual", residual, x, false);
  return rms_norm_forward(x, &residual, weight, eps, rms_out_dtype("add_rms_norm", x, out_dtype));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& rstd, const std::optional<at::Tensor>& grad_res) {
  check_rms_norm_backward_args(grad_out, x, weight, rstd, grad_res);
  const c10::ScalarType acc = rms_acc_dtype(x.scalar_type());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int64_t C = x.size(-1);
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  const int64_t blocks = std::min<int64_t>(rows, kRmsNormBwdBlocks);
  at::Tensor partial = at::zeros({std::max<int64_t>(blocks, 1), C}, x.options().dtype(acc));
  if (dx.numel() > 0) {
    RmsNormBwdParams p{};
    const at::Tensor go = with_row_layout(grad_out, p.go_rows);
    const at::Tensor xr = with_row_layout(x, p.x_rows);
    at::Tensor gr;
    if (grad_res.has_value()) {
      gr = with_row_layout(*grad_res, p.gr_rows);
      p.grad_res = gr.const_data_ptr();
    }
    const at::Tensor w = weight.to(acc).contiguous();
    const at::Tensor rs = rstd.contiguous();
    p.x_dtype = x.scalar_type();
    p.out_dtype = grad_out.scalar_type();
    p.rows = rows;
    p.C = C;
    p.grad_out = go.const_data_ptr();
    p.x = xr.const_data_ptr();
    p.weight = w.const_data_ptr();
    p.rstd = rs.const_data_ptr();
    p.dx = dx.data_ptr();
    p.dw_partial = partial.data_ptr();
    p.blocks = blocks;
    rms_norm_bwd_stub.get()(p);
  }
  // The kernel leaves the block sums in partial's first row (a fixed order: deterministic).
  return {dx, partial[0].to(weight.scalar_type())};
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace gptmod
