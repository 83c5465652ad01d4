// cross_entropy / cross_entropy_backward on CUDA (gptmod/cross_entropy.h). Same math as the CPU
// kernels (csrc/cpu/kernels/cross_entropy_kernel.cpp), shared through gptmod/cross_entropy.h and
// gptmod/elementwise_math.h. Targets are not checked on the GPU (a check would cost a device
// sync): a target outside [0, V) that is not ignore_index makes its row's loss and gradient NaN.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "gptmod/cross_entropy_args.h"
#include "gptmod/cuda_utils.cuh"
#include "gptmod/elementwise_args.h"

namespace gptmod {
namespace {

using cuda::acc_t;

constexpr int kThreads = 512;

// Forward. One block per row (grid-stride over rows), threads striding over the V logits: the
// max of the raw logits (the cap is monotonic), then the sum of exp(z - max z), both block
// reductions in a fixed order; thread 0 writes lse and the row's loss.
template <typename scalar_t>
__global__ void cross_entropy_fwd_kernel(const scalar_t* __restrict__ logits,  // [rows, V]
                                         const RowLayout logits_rows,
                                         const int64_t* __restrict__ targets,  // [rows]
                                         acc_t<scalar_t>* __restrict__ lse,       // [rows]
                                         acc_t<scalar_t>* __restrict__ row_loss,  // [rows]
                                         const int64_t rows, const int64_t V, const double softcap,
                                         const int64_t ignore_index) {
  using acc = acc_t<scalar_t>;
  __shared__ acc scratch[32];
  const acc cap = acc(softcap);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* x = logits + logits_rows.offset(r);
    acc m = -std::numeric_limits<acc>::infinity();
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = fmax(m, static_cast<acc>(x[j]));
    m = cuda::block_reduce(m, cuda::MaxOp(), scratch);
    const acc mz = softcap_logit<acc>(m, cap);
    acc s = 0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
      s += gptmod_exp(softcap_logit<acc>(static_cast<acc>(x[j]), cap) - mz);
    s = cuda::block_reduce(s, cuda::SumOp(), scratch);
    if (threadIdx.x == 0) {
      const acc l = mz + gptmod_log(s);
      const int64_t t = targets[r];
      lse[r] = l;
      if (t == ignore_index) {
        row_loss[r] = acc(0);
      } else if (t < 0 || t >= V) {
        row_loss[r] = std::numeric_limits<acc>::quiet_NaN();
      } else {
        row_loss[r] = l - softcap_logit<acc>(static_cast<acc>(x[t]), cap);
      }
    }
  }
}

// Backward. Same layout; every thread writes its own columns of the gradient row, the target's
// column with its -1 term included (no second write to fix it up).
template <typename scalar_t>
__global__ void cross_entropy_bwd_kernel(const scalar_t* __restrict__ logits,  // [rows, V]
                                         const RowLayout logits_rows,
                                         const int64_t* __restrict__ targets,     // [rows]
                                         const acc_t<scalar_t>* __restrict__ lse,    // [rows]
                                         const acc_t<scalar_t>* __restrict__ scale,  // 0-d
                                         scalar_t* __restrict__ grad,  // [rows, V] contiguous
                                         const int64_t rows, const int64_t V, const double softcap,
                                         const int64_t ignore_index) {
  using acc = acc_t<scalar_t>;
  const acc cap = acc(softcap);
  const acc sc = *scale;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* x = logits + logits_rows.offset(r);
    scalar_t* g = grad + r * V;
    const int64_t t = targets[r];
    if (t == ignore_index) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = static_cast<scalar_t>(acc(0));
      continue;
    }
    const acc bad = (t < 0 || t >= V) ? std::numeric_limits<acc>::quiet_NaN() : acc(0);
    const acc l = lse[r];
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      const acc z = softcap_logit<acc>(static_cast<acc>(x[j]), cap);
      const acc p = gptmod_exp(z - l) - (j == t ? acc(1) : acc(0));
      g[j] = static_cast<scalar_t>(sc * p * softcap_grad<acc>(z, cap) + bad);
    }
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(rows, 65535)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& logits,
                                                      const at::Tensor& targets, double softcap,
                                                      int64_t ignore_index) {
  check_cross_entropy_args("cross_entropy", logits, targets, softcap);
  const auto acc = logits.options().dtype(ce_acc_dtype(logits.scalar_type()));
  const int64_t V = logits.size(-1), rows = logits.numel() / V;
  at::Tensor lse = at::empty(targets.sizes(), acc);
  at::Tensor row_loss = at::zeros({rows}, acc);
  const c10::cuda::CUDAGuard guard(logits.device());
  if (rows > 0) {
    cuda::check_device_arch(logits.get_device());
    RowLayout lrows;
    const at::Tensor lg = with_row_layout(logits, lrows);
    const at::Tensor t = targets.contiguous();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(),
                                    "cross_entropy_cuda", [&] {
      cross_entropy_fwd_kernel<scalar_t><<<row_blocks(rows), kThreads, 0, stream>>>(
          lg.const_data_ptr<scalar_t>(), lrows, t.const_data_ptr<int64_t>(),
          lse.mutable_data_ptr<acc_t<scalar_t>>(), row_loss.mutable_data_ptr<acc_t<scalar_t>>(),
          rows, V, softcap, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // The mean over counted rows without a host sync; 0 / 0 = nan when every target is ignored.
  at::Tensor count = targets.ne(ignore_index).sum().to(acc.dtype());
  return {row_loss.sum() / count, lse};
}

at::Tensor cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                       const at::Tensor& targets, const at::Tensor& lse,
                                       double softcap, int64_t ignore_index) {
  check_cross_entropy_backward_args(grad_loss, logits, targets, lse, softcap);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const int64_t V = logits.size(-1), rows = logits.numel() / V;
  if (rows == 0) return grad;
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::check_device_arch(logits.get_device());
  const auto acc = ce_acc_dtype(logits.scalar_type());
  const at::Tensor scale = grad_loss.to(acc) / targets.ne(ignore_index).sum().to(acc);
  RowLayout lrows;
  const at::Tensor lg = with_row_layout(logits, lrows);
  const at::Tensor t = targets.contiguous();
  const at::Tensor l = lse.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(),
                                  "cross_entropy_backward_cuda", [&] {
    cross_entropy_bwd_kernel<scalar_t><<<row_blocks(rows), kThreads, 0, stream>>>(
        lg.const_data_ptr<scalar_t>(), lrows, t.const_data_ptr<int64_t>(),
        l.const_data_ptr<acc_t<scalar_t>>(), scale.const_data_ptr<acc_t<scalar_t>>(),
        grad.mutable_data_ptr<scalar_t>(), rows, V, softcap, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

TORCH_LIBRARY_IMPL(gptmod, CUDA, m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cuda);
}

}  // namespace gptmod
