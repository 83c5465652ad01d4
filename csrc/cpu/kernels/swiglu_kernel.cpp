// CPU kernels of swiglu / swiglu_backward (docs/design.md section 2), compiled once per CPU capability.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "gptmod/cpu_rows.h"
#include "gptmod/dispatch.h"
#include "gptmod/swiglu.h"

namespace gptmod {
namespace {

using namespace gptmod::vec;

// Rows per parallel task so that a task moves ~16K elements: fewer and the thread hand-off
// costs more than the work.
inline int64_t row_grain(int64_t F) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, F));
}

// out[r, j] = silu(g[r, j]) * u[r, j] with g = gate_up[r, :F], u = gate_up[r, F:].
// Threads: at::parallel_for over rows; one pass, each input and output element touched once.
template <typename scalar_t>
void swiglu_fwd_impl(const SwigluParams& p) {
  const auto* gate_up = static_cast<const scalar_t*>(p.gate_up);  // [rows, 2F] (row layout)
  auto* out = static_cast<scalar_t*>(p.out);                       // [rows, F] contiguous
  const int64_t F = p.F;
  at::parallel_for(0, p.rows, row_grain(F), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = gate_up + p.gate_up_rows.offset(r);
      swiglu_row(g, g + F, out + r * F, F);
    }
  });
}

// grad[r, :F] = d_gate, grad[r, F:] = d_up, recomputing s = sigma(g) from gate_up.
// Threads: at::parallel_for over rows; one pass over grad_out and gate_up.
template <typename scalar_t>
void swiglu_bwd_impl(const SwigluParams& p) {
  using acc = acc_t<scalar_t>;
  using V = AVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  const auto* gate_up = static_cast<const scalar_t*>(p.gate_up);    // [rows, 2F] (row layout)
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out);  // [rows, F] (row layout)
  auto* grad = static_cast<scalar_t*>(p.out);                        // [rows, 2F] contiguous
  const int64_t F = p.F;
  at::parallel_for(0, p.rows, row_grain(2 * F), [&](int64_t begin, int64_t end) {
    const V one(1);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict__ g = gate_up + p.gate_up_rows.offset(r);    // [F]
      const scalar_t* __restrict__ u = g + F;                                 // [F]
      const scalar_t* __restrict__ dy = grad_out + p.grad_out_rows.offset(r);  // [F]
      scalar_t* __restrict__ dg = grad + r * 2 * F;                           // [F]
      scalar_t* __restrict__ du = dg + F;                                     // [F]
      int64_t j = 0;
      for (; j + kS <= F; j += kS) {
        V ga, gb, ua, ub, dya, dyb;
        load2(g + j, ga, gb);
        load2(u + j, ua, ub);
        load2(dy + j, dya, dyb);
        const V sa = vsigmoid(ga), sb = vsigmoid(gb);
        const V dsa = dya * sa, dsb = dyb * sb;
        store2(du + j, dsa * ga, dsb * gb);
        store2(dg + j, dsa * ua * (one + ga * (one - sa)), dsb * ub * (one + gb * (one - sb)));
      }
      if (j + kS / 2 <= F) {
        const V gv = load1(g + j), uv = load1(u + j), dyv = load1(dy + j);
        const V sv = vsigmoid(gv);
        const V ds = dyv * sv;
        store1(du + j, ds * gv);
        store1(dg + j, ds * uv * (one + gv * (one - sv)));
        j += kS / 2;
      }
      for (; j < F; ++j) {
        acc d_gate, d_up;
        swiglu_bwd<acc>(acc(dy[j]), acc(g[j]), acc(u[j]), d_gate, d_up);
        dg[j] = scalar_t(d_gate);
        du[j] = scalar_t(d_up);
      }
    }
  });
}


void swiglu_fwd_kernel(const SwigluParams& p) {
  GPTMOD_DISPATCH_FLOATING_TYPES(p.dtype, "swiglu", [&] { swiglu_fwd_impl<scalar_t>(p); });
}

void swiglu_bwd_kernel(const SwigluParams& p) {
  GPTMOD_DISPATCH_FLOATING_TYPES(p.dtype, "swiglu_backward", [&] { swiglu_bwd_impl<scalar_t>(p); });
}

}  // namespace
GPTMOD_REGISTER_KERNEL(swiglu_fwd_stub, swiglu_fwd_kernel);
GPTMOD_REGISTER_KERNEL(swiglu_bwd_stub, swiglu_bwd_kernel);
}  // namespace gptmod
