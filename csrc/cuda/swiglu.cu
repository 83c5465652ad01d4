// swiglu / swiglu_backward on CUDA (docs/design.md section 2). Same indexing and math as the CPU
// kernels (csrc/cpu/kernels/swiglu_kernel.cpp); shared scalar math in gptmod/elementwise_math.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "gptmod/cuda_utils.cuh"
#include "gptmod/dispatch.h"
#include "gptmod/elementwise_args.h"
#include "gptmod/elementwise_math.h"

namespace gptmod {
namespace {

using cuda::acc_t;

// Forward. One work item = N consecutive features j .. j+N of one row r: reads g = gate_up[r, j..]
// and u = gate_up[r, F + j..], writes out[r, j..]. Items are numbered row-major over
// [rows, F / N]; a grid-stride loop of 1-D blocks walks them (coalesced along a row).
// N = 16 bytes / sizeof(T) when F, the row strides and the base pointers allow aligned 16-byte
// accesses (one 128-bit load or store each, cuda::load_vec / store_vec), else 1.
template <typename scalar_t, int N>
__global__ void swiglu_fwd_kernel(const scalar_t* __restrict__ gate_up,  // [rows, 2F] by gu_rows
                                  scalar_t* __restrict__ out,            // [rows, F] contiguous
                                  const int64_t rows, const int64_t F, const RowLayout gu_rows) {
  using acc = acc_t<scalar_t>;
  const int64_t chunks = F / N;
  const int64_t items = rows * chunks;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = item / chunks;
    const int64_t j = (item % chunks) * N;
    const scalar_t* g = gate_up + gu_rows.offset(r);
    acc gv[N], uv[N], o[N];
    cuda::load_vec<scalar_t, N>(g + j, gv);
    cuda::load_vec<scalar_t, N>(g + F + j, uv);
#pragma unroll
    for (int k = 0; k < N; ++k) o[k] = swiglu_fwd<acc>(gv[k], uv[k]);
    cuda::store_vec<scalar_t, N>(out + r * F + j, o);
  }
}

// Backward. Same item layout as the forward; reads grad_out[r, j..], g and u, writes
// grad[r, j..] (d_gate) and grad[r, F + j..] (d_up).
template <typename scalar_t, int N>
__global__ void swiglu_bwd_kernel(const scalar_t* __restrict__ grad_out,  // [rows, F] by go_rows
                                  const scalar_t* __restrict__ gate_up,   // [rows, 2F] by gu_rows
                                  scalar_t* __restrict__ grad,            // [rows, 2F] contiguous
                                  const int64_t rows, const int64_t F, const RowLayout go_rows,
                                  const RowLayout gu_rows) {
  using acc = acc_t<scalar_t>;
  const int64_t chunks = F / N;
  const int64_t items = rows * chunks;
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = item / chunks;
    const int64_t j = (item % chunks) * N;
    const scalar_t* g = gate_up + gu_rows.offset(r);
    acc gv[N], uv[N], dy[N], dg[N], du[N];
    cuda::load_vec<scalar_t, N>(g + j, gv);
    cuda::load_vec<scalar_t, N>(g + F + j, uv);
    cuda::load_vec<scalar_t, N>(grad_out + go_rows.offset(r) + j, dy);
#pragma unroll
    for (int k = 0; k < N; ++k) swiglu_bwd<acc>(dy[k], gv[k], uv[k], dg[k], du[k]);
    cuda::store_vec<scalar_t, N>(grad + r * 2 * F + j, dg);
    cuda::store_vec<scalar_t, N>(grad + r * 2 * F + F + j, du);
  }
}

bool rows_pack16(const void* base, const RowLayout& l, int n) {
  return cuda::aligned16(base) && l.outer_stride % n == 0 && l.inner_stride % n == 0;
}

}  // namespace

at::Tensor swiglu_cuda(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up);
  const int64_t F = gate_up.size(-1) / 2;
  at::Tensor out = swiglu_empty_out(gate_up);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(gate_up.device());
  cuda::check_device_arch(gate_up.get_device());
  RowLayout gu_rows;
  const at::Tensor gu = with_row_layout(gate_up, gu_rows);
  const int64_t rows = out.numel() / F;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  GPTMOD_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "swiglu_cuda", [&] {
    constexpr int N = cuda::kPack16<scalar_t>;
    const auto* in = gu.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<scalar_t>();
    if (F % N == 0 && rows_pack16(in, gu_rows, N) && cuda::aligned16(o)) {
      swiglu_fwd_kernel<scalar_t, N><<<cuda::grid_for(rows * (F / N), kThreads), kThreads, 0,
                                       stream>>>(in, o, rows, F, gu_rows);
    } else {
      swiglu_fwd_kernel<scalar_t, 1>
          <<<cuda::grid_for(rows * F, kThreads), kThreads, 0, stream>>>(in, o, rows, F, gu_rows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& gate_up) {
  check_swiglu_args("swiglu_backward", gate_up, &grad_out);
  at::Tensor grad = at::empty(gate_up.sizes(), gate_up.options());
  if (grad.numel() == 0) return grad;
  const c10::cuda::CUDAGuard guard(gate_up.device());
  cuda::check_device_arch(gate_up.get_device());
  RowLayout gu_rows, go_rows;
  const at::Tensor gu = with_row_layout(gate_up, gu_rows);
  const at::Tensor dy = with_row_layout(grad_out, go_rows);
  const int64_t F = gate_up.size(-1) / 2;
  const int64_t rows = grad.numel() / (2 * F);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  GPTMOD_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "swiglu_backward_cuda", [&] {
    constexpr int N = cuda::kPack16<scalar_t>;
    const auto* in = gu.const_data_ptr<scalar_t>();
    const auto* d = dy.const_data_ptr<scalar_t>();
    auto* o = grad.mutable_data_ptr<scalar_t>();
    if (F % N == 0 && rows_pack16(in, gu_rows, N) && rows_pack16(d, go_rows, N) &&
        cuda::aligned16(o)) {
      swiglu_bwd_kernel<scalar_t, N><<<cuda::grid_for(rows * (F / N), kThreads), kThreads, 0,
                                       stream>>>(d, in, o, rows, F, go_rows, gu_rows);
    } else {
      swiglu_bwd_kernel<scalar_t, 1><<<cuda::grid_for(rows * F, kThreads), kThreads, 0,
                                       stream>>>(d, in, o, rows, F, go_rows, gu_rows);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

TORCH_LIBRARY_IMPL(gptmod, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace gptmod
