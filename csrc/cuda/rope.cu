// rope / rope_ on CUDA (docs/design.md section 2). Same indexing and math as the CPU kernel
// (csrc/cpu/kernels/rope_kernel.cpp); shared scalar math in gptmod/elementwise_math.h.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
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

// One work item = N consecutive pairs of one (b, t, h) head row:
//   half-split:  x[i .. i+N) with x[D/2 + i .. D/2 + i+N)  (two N-element accesses)
//   interleaved: x[2i .. 2i+2N)                            (two N-element accesses)
// Items are numbered row-major over [B, T, H, D/2 / N]; a grid-stride loop of 1-D blocks walks
// them, so consecutive threads touch consecutive memory of one row. N = 16 bytes / sizeof(T)
// when every pointer, stride and D/2 allow aligned 16-byte accesses, else 1. With N > 1 each
// access is one 128-bit load or store (cuda::load_vec / store_vec) and the item's N cos and N
// sin values come in 16-byte loads too.
//
// Out-of-range positions cannot raise from inside a kernel without a host sync, so the kernel
// never reads the tables for them and writes NaN into that token's output instead (documented in
// the entry point).
template <typename scalar_t, int N, bool kInterleaved>
__global__ void rope_kernel(const scalar_t* x,                   // [B, T, H, D] strided; may = out
                            scalar_t* out,                       // [B, T, H, D] strided
                            const acc_t<scalar_t>* __restrict__ cos,  // [max_pos, D/2]
                            const acc_t<scalar_t>* __restrict__ sin,  // [max_pos, D/2]
                            const void* __restrict__ positions,  // nullptr, [T] or [B, T]
                            const RopeParams p) {
  using acc = acc_t<scalar_t>;
  const int64_t half = p.D / 2;
  const int64_t chunks = half / N;  // items per head row
  const int64_t items = p.B * p.T * p.H * chunks;
  const acc sgn = p.inverse ? acc(-1) : acc(1);
  for (int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = (item % chunks) * N;  // first pair of this item
    int64_t row = item / chunks;
    const int64_t h = row % p.H;
    row /= p.H;
    const int64_t t = row % p.T;
    const int64_t b = row / p.T;
    int64_t pos = t;
    if (positions != nullptr) {
      const int64_t off = b * p.pos_sb + t * p.pos_st;
      pos = p.positions_int64 ? static_cast<const int64_t*>(positions)[off]
                              : int64_t(static_cast<const int32_t*>(positions)[off]);
    }
    const scalar_t* xr = x + b * p.x_sb + t * p.x_st + h * p.x_sh;
    scalar_t* orow = out + b * p.out_sb + t * p.out_st + h * p.out_sh;
    // Offsets of the two N-element accesses: the x1 and x2 spans, or the two halves of the
    // interleaved 2N-element span.
    const int64_t o1 = kInterleaved ? 2 * i : i;
    const int64_t o2 = kInterleaved ? 2 * i + N : half + i;
    acc a[N], bq[N], ya[N], yb[N];
    cuda::load_vec<scalar_t, N>(xr + o1, a);
    cuda::load_vec<scalar_t, N>(xr + o2, bq);
    if (pos < 0 || pos >= p.max_pos) {
#pragma unroll
      for (int k = 0; k < N; ++k) ya[k] = yb[k] = acc(NAN);
    } else {
      acc c[N], s[N];
      cuda::load_vec<acc, N>(cos + pos * p.cos_stride + i, c);
      cuda::load_vec<acc, N>(sin + pos * p.sin_stride + i, s);
#pragma unroll
      for (int q = 0; q < N; ++q) {
        if constexpr (kInterleaved) {
          // Pair q sits at lanes 2q, 2q + 1 of the 2N-element span [a | bq].
          const int e = 2 * q;
          const acc x1 = e < N ? a[e] : bq[e - N];
          const acc x2 = e + 1 < N ? a[e + 1] : bq[e + 1 - N];
          rope_pair<acc>(x1, x2, c[q], sgn * s[q], e < N ? ya[e] : yb[e - N],
                         e + 1 < N ? ya[e + 1] : yb[e + 1 - N]);
        } else {
          rope_pair<acc>(a[q], bq[q], c[q], sgn * s[q], ya[q], yb[q]);
        }
      }
    }
    cuda::store_vec<scalar_t, N>(orow + o1, ya);
    cuda::store_vec<scalar_t, N>(orow + o2, yb);
  }
}

template <typename scalar_t, int N>
void launch(const RopeParams& p, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  const int64_t items = p.B * p.T * p.H * (p.D / 2 / N);
  constexpr int kThreads = 256;
  const auto* x = static_cast<const scalar_t*>(p.x);
  auto* out = static_cast<scalar_t*>(p.out);
  const auto* c = static_cast<const acc*>(p.cos);
  const auto* s = static_cast<const acc*>(p.sin);
  if (p.interleaved) {
    rope_kernel<scalar_t, N, true>
        <<<cuda::grid_for(items, kThreads), kThreads, 0, stream>>>(x, out, c, s, p.positions, p);
  } else {
    rope_kernel<scalar_t, N, false>
        <<<cuda::grid_for(items, kThreads), kThreads, 0, stream>>>(x, out, c, s, p.positions, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte accesses need N | D/2 (each half-split half and each interleaved 2N span start on a
// multiple of N), 16-byte aligned bases, and strides that keep every row aligned, in x, out and
// the tables.
template <typename scalar_t>
bool can_pack16(const RopeParams& p) {
  constexpr int N = cuda::kPack16<scalar_t>;
  const int64_t half = p.D / 2;
  if (half % N != 0) return false;
  if (!cuda::aligned16(p.x) || !cuda::aligned16(p.out)) return false;
  for (int64_t st : {p.x_sb, p.x_st, p.x_sh, p.out_sb, p.out_st, p.out_sh}) {
    if (st % N != 0) return false;
  }
  // The N cos/sin values of an item are N * sizeof(acc) bytes (a multiple of 16) at a multiple
  // of that offset in their row: 16-byte loads when the rows start on 16 bytes.
  constexpr int kTableVec = 16 / int(sizeof(acc_t<scalar_t>));
  return cuda::aligned16(p.cos) && cuda::aligned16(p.sin) && p.cos_stride % kTableVec == 0 &&
         p.sin_stride % kTableVec == 0;
}

void rope_run(const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos,
              const at::Tensor& sin, const std::optional<at::Tensor>& positions,
              bool interleaved, bool inverse) {
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::check_device_arch(x.get_device());
  const at::ScalarType table_t = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor c = cos.to(table_t), s = sin.to(table_t);
  const RopeParams p = rope_params(x, out, c, s, positions, interleaved, inverse);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GPTMOD_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rope_cuda", [&] {
    if (can_pack16<scalar_t>(p)) {
      launch<scalar_t, cuda::kPack16<scalar_t>>(p, stream);
    } else {
      launch<scalar_t, 1>(p, stream);
    }
  });
}

}  // namespace

// Positions are not range-checked here (that would need a device-to-host sync per call); an
// out-of-range position yields NaN for that token and never an out-of-bounds read.
at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  check_rope_args("rope", x, cos, sin, positions);
  at::Tensor out = at::empty(x.sizes(), x.options());
  rope_run(x, out, cos, sin, positions, interleaved, inverse);
  return out;
}

void rope_inplace_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& positions, bool interleaved,
                       bool inverse) {
  check_rope_args("rope_", x, cos, sin, positions);
  // Writing through a view whose elements share memory (an expand) would race.
  at::assert_no_internal_overlap(x);
  rope_run(x, x, cos, sin, positions, interleaved, inverse);
}

TORCH_LIBRARY_IMPL(gptmod, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_", &rope_inplace_cuda);
}

}  // namespace gptmod
