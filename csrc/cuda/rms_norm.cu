// rms_norm / add_rms_norm / rms_norm_backward on CUDA (gptmod/rms_norm.h). Same indexing and math
// as the CPU kernels (csrc/cpu/kernels/rms_norm_kernel.cpp); shared scalar math in
// gptmod/rms_norm.h and gptmod/elementwise_math.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gptmod/cuda_utils.cuh"
#include "gptmod/elementwise_args.h"
#include "gptmod/rms_norm_args.h"

namespace gptmod {
namespace {

using cuda::acc_t;

constexpr int kThreads = 256;

// Forward. One block per row (a grid-stride loop over rows), thread k handles columns k,
// k + blockDim, ...: the sum of squares (block reduction), then out = s * rstd * w. For
// add_rms_norm each thread first writes s = x + res (rounded to x_t) and later reads back the
// same columns it wrote, so no synchronization is needed between the two.
template <typename x_t, typename o_t>
__global__ void rms_norm_fwd_kernel(const x_t* __restrict__ x,    // [rows, C] by x_rows
                                    const RowLayout x_rows,
                                    const x_t* __restrict__ res,  // [rows, C] by res_rows, or null
                                    const RowLayout res_rows,
                                    const acc_t<x_t>* __restrict__ w,  // [C]
                                    o_t* __restrict__ out,             // [rows, C] contiguous
                                    x_t* __restrict__ sum,  // [rows, C] contiguous, or null
                                    acc_t<x_t>* __restrict__ rstd,     // [rows]
                                    const int64_t rows, const int64_t C, const double eps) {
  using acc = acc_t<x_t>;
  __shared__ acc scratch[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const x_t* xr = x + x_rows.offset(r);
    const x_t* rr = res != nullptr ? res + res_rows.offset(r) : nullptr;
    x_t* sr = sum != nullptr ? sum + r * C : nullptr;
    acc ss = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      x_t v = xr[j];
      if (rr != nullptr) {
        v = static_cast<x_t>(static_cast<acc>(v) + static_cast<acc>(rr[j]));
        sr[j] = v;
      }
      const acc a = static_cast<acc>(v);
      ss += a * a;
    }
    ss = cuda::block_reduce(ss, cuda::SumOp(), scratch);
    const acc rs = rms_rstd<acc>(ss, C, eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    const x_t* src = rr != nullptr ? sr : xr;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
      out[r * C + j] = static_cast<o_t>(static_cast<acc>(src[j]) * rs * w[j]);
  }
}

// Backward. Same row/column layout as the forward; block b adds its rows' weight gradients into
// partial[b] (each column owned by one thread: no atomics, a fixed order), summed afterwards.
template <typename x_t, typename o_t>
__global__ void rms_norm_bwd_kernel(const o_t* __restrict__ dy,  // [rows, C] by go_rows
                                    const RowLayout go_rows,
                                    const x_t* __restrict__ x,   // [rows, C] by x_rows
                                    const RowLayout x_rows,
                                    const acc_t<x_t>* __restrict__ w,     // [C]
                                    const acc_t<x_t>* __restrict__ rstd,  // [rows]
                                    const x_t* __restrict__ gres,  // [rows, C] by gr_rows, or null
                                    const RowLayout gr_rows,
                                    x_t* __restrict__ dx,                 // [rows, C] contiguous
                                    acc_t<x_t>* __restrict__ partial,     // [gridDim.x, C], zeroed
                                    const int64_t rows, const int64_t C) {
  using acc = acc_t<x_t>;
  __shared__ acc scratch[32];
  acc* part = partial + int64_t(blockIdx.x) * C;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const o_t* dyr = dy + go_rows.offset(r);
    const x_t* xr = x + x_rows.offset(r);
    acc dot = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
      dot += static_cast<acc>(dyr[j]) * w[j] * static_cast<acc>(xr[j]);
    dot = cuda::block_reduce(dot, cuda::SumOp(), scratch);
    const acc rs = rstd[r];
    const acc c = rs * rs * rs * dot / acc(C);
    const x_t* gr = gres != nullptr ? gres + gr_rows.offset(r) : nullptr;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc g = static_cast<acc>(dyr[j]), s = static_cast<acc>(xr[j]);
      acc v = rs * g * w[j] - s * c;
      if (gr != nullptr) v += static_cast<acc>(gr[j]);
      dx[r * C + j] = static_cast<x_t>(v);
      part[j] += g * s * rs;
    }
  }
}

unsigned int row_blocks(int64_t rows, int64_t cap) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(rows, cap)));
}

// Calls f.template operator()<x_t, o_t>() for the dtype pairs the ops take.
template <typename F>
void dispatch_pair(c10::ScalarType x, c10::ScalarType o, const char* op, F&& f) {
  using c10::ScalarType;
  if (x == ScalarType::Float && o == ScalarType::Float) return f.template operator()<float, float>();
  if (x == ScalarType::Float && o == ScalarType::BFloat16)
    return f.template operator()<float, c10::BFloat16>();
  if (x == ScalarType::Float && o == ScalarType::Half)
    return f.template operator()<float, c10::Half>();
  if (x == ScalarType::BFloat16 && o == x)
    return f.template operator()<c10::BFloat16, c10::BFloat16>();
  if (x == ScalarType::Half && o == x) return f.template operator()<c10::Half, c10::Half>();
  if (x == ScalarType::Double && o == x) return f.template operator()<double, double>();
  TORCH_CHECK(false, op, ": unsupported dtypes ", x, " -> ", o);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward_cuda(
    const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
    double eps, c10::ScalarType out_dtype) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  at::Tensor sum = residual ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor rstd = rms_rstd_empty(x);
  if (out.numel() == 0) return {out, sum, rstd.fill_(0)};
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_device_arch(x.get_device());
  RowLayout x_rows, res_rows;
  const at::Tensor xr = with_row_layout(x, x_rows);
  const at::Tensor rr = residual ? with_row_layout(*residual, res_rows) : at::Tensor();
  const at::Tensor w = weight.to(rms_acc_dtype(x.scalar_type())).contiguous();
  const int64_t C = x.size(-1), rows = x.numel() / C;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(x.scalar_type(), out_dtype, op, [&]<typename x_t, typename o_t>() {
    rms_norm_fwd_kernel<x_t, o_t><<<row_blocks(rows, 65535), kThreads, 0, stream>>>(
        xr.const_data_ptr<x_t>(), x_rows, residual ? rr.const_data_ptr<x_t>() : nullptr, res_rows,
        w.const_data_ptr<acc_t<x_t>>(), out.mutable_data_ptr<o_t>(),
        residual ? sum.mutable_data_ptr<x_t>() : nullptr, rstd.mutable_data_ptr<acc_t<x_t>>(),
        rows, C, eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, sum, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 double eps,
                                                 std::optional<c10::ScalarType> out_dtype) {
  check_rms_norm_args("rms_norm", x, weight, eps);
  auto [out, sum, rstd] = rms_norm_forward_cuda("rms_norm", x, nullptr, weight, eps,
                                                rms_out_dtype("rms_norm", x, out_dtype));
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
    std::optional<c10::ScalarType> out_dtype) {
  check_rms_norm_args("add_rms_norm", x, weight, eps);
  check_rms_like_x("add_rms_norm", "residual", residual, x, false);
  return rms_norm_forward_cuda("add_rms_norm", x, &residual, weight, eps,
                               rms_out_dtype("add_rms_norm", x, out_dtype));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& rstd, const std::optional<at::Tensor>& grad_res) {
  check_rms_norm_backward_args(grad_out, x, weight, rstd, grad_res);
  const c10::ScalarType acc = rms_acc_dtype(x.scalar_type());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const int64_t C = x.size(-1);
  const int64_t rows = C == 0 ? 0 : x.numel() / C;
  if (dx.numel() == 0) return {dx, at::zeros(weight.sizes(), weight.options())};
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_device_arch(x.get_device());
  // A fixed block count: the weight gradient's sum order does not change between calls.
  const unsigned int blocks = row_blocks(rows, 512);
  at::Tensor partial = at::zeros({int64_t(blocks), C}, x.options().dtype(acc));
  RowLayout go_rows, x_rows, gr_rows;
  const at::Tensor go = with_row_layout(grad_out, go_rows);
  const at::Tensor xr = with_row_layout(x, x_rows);
  const at::Tensor gr = grad_res.has_value() ? with_row_layout(*grad_res, gr_rows) : at::Tensor();
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor rs = rstd.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_pair(x.scalar_type(), grad_out.scalar_type(), "rms_norm_backward",
                [&]<typename x_t, typename o_t>() {
    rms_norm_bwd_kernel<x_t, o_t><<<blocks, kThreads, 0, stream>>>(
        go.const_data_ptr<o_t>(), go_rows, xr.const_data_ptr<x_t>(), x_rows,
        w.const_data_ptr<acc_t<x_t>>(), rs.const_data_ptr<acc_t<x_t>>(),
        grad_res.has_value() ? gr.const_data_ptr<x_t>() : nullptr, gr_rows,
        dx.mutable_data_ptr<x_t>(), partial.mutable_data_ptr<acc_t<x_t>>(), rows, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, partial.sum(0).to(weight.scalar_type())};
}

TORCH_LIBRARY_IMPL(gptmod, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace gptmod
