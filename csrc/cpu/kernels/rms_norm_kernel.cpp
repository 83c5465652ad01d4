// CPU kernels of rms_norm / add_rms_norm / rms_norm_backward (gptmod/rms_norm.h), compiled once
// per CPU capability. Rows are independent: at::parallel_for over rows, each row read twice
// (sum of squares, then the scaled write) while it sits in L1 (C of a few hundred to a few
// thousand elements).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "gptmod/rms_norm.h"
#include "gptmod/vec_utils.h"

namespace gptmod {
namespace {

using namespace gptmod::vec;

inline int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
}

// One row: s = x (+ res, rounded to x_t and written to sum), rstd, out = s * rstd * w.
template <typename x_t, typename o_t>
void norm_row(const x_t* __restrict__ x, const x_t* __restrict__ res, x_t* __restrict__ sum,
              const acc_t<x_t>* __restrict__ w, o_t* __restrict__ out, acc_t<x_t>* rstd_out,
              int64_t C, double eps) {
  using acc = acc_t<x_t>;
  using V = AVec<x_t>;
  constexpr int64_t kS = kStep<x_t>;
  constexpr int64_t kN = V::size();
  static_assert(kStep<o_t> == kS, "out dtype must share x's vector step");
  const x_t* s = x;
  if (res != nullptr) {  // sum = x + res in x's dtype; the norm reads the rounded sum back
    int64_t j = 0;
    for (; j + kS <= C; j += kS) {
      V xa, xb, ra, rb;
      load2(x + j, xa, xb);
      load2(res + j, ra, rb);
      store2(sum + j, xa + ra, xb + rb);
    }
    for (; j < C; ++j) sum[j] = x_t(acc(x[j]) + acc(res[j]));
    s = sum;
  }
  V ss0(0), ss1(0);
  int64_t j = 0;
  for (; j + kS <= C; j += kS) {
    V a, b;
    load2(s + j, a, b);
    ss0 = at::vec::fmadd(a, a, ss0);
    ss1 = at::vec::fmadd(b, b, ss1);
  }
  acc ss = lane_sum(ss0 + ss1);
  for (; j < C; ++j) ss += acc(s[j]) * acc(s[j]);
  const acc r = rms_rstd<acc>(ss, C, eps);
  *rstd_out = r;
  const V rv(r);
  j = 0;
  for (; j + kS <= C; j += kS) {
    V a, b;
    load2(s + j, a, b);
    store2(out + j, a * rv * V::loadu(w + j), b * rv * V::loadu(w + j + kN));
  }
  for (; j < C; ++j) out[j] = o_t(acc(s[j]) * r * w[j]);
}

template <typename x_t, typename o_t>
void rms_norm_fwd_impl(const RmsNormParams& p) {
  using acc = acc_t<x_t>;
  const auto* x = static_cast<const x_t*>(p.x);           // [rows, C] by x_rows
  const auto* res = static_cast<const x_t*>(p.residual);  // [rows, C] by res_rows, or null
  auto* sum = static_cast<x_t*>(p.sum);                   // [rows, C] contiguous, or null
  const auto* w = static_cast<const acc*>(p.weight);      // [C]
  auto* out = static_cast<o_t*>(p.out);                   // [rows, C] contiguous
  auto* rstd = static_cast<acc*>(p.rstd);                 // [rows]
  const int64_t C = p.C;
  at::parallel_for(0, p.rows, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      norm_row<x_t, o_t>(x + p.x_rows.offset(r), res ? res + p.res_rows.offset(r) : nullptr,
                         sum ? sum + r * C : nullptr, w, out + r * C, rstd + r, C, p.eps);
    }
  });
}

// One row of the backward: dx = rstd * g - s * c with g = dy * w, c = rstd^3 * sum(g s) / C
// (+ grad_res); dw_acc += dy * s * rstd.
template <typename x_t, typename o_t>
void norm_bwd_row(const o_t* __restrict__ dy, const x_t* __restrict__ s,
                  const acc_t<x_t>* __restrict__ w, acc_t<x_t> r, const x_t* __restrict__ gres,
                  x_t* __restrict__ dx, acc_t<x_t>* __restrict__ dw, int64_t C) {
  using acc = acc_t<x_t>;
  using V = AVec<x_t>;
  constexpr int64_t kS = kStep<x_t>;
  constexpr int64_t kN = V::size();
  V d0(0), d1(0);
  int64_t j = 0;
  for (; j + kS <= C; j += kS) {
    V ga, gb, sa, sb;
    load2(dy + j, ga, gb);
    load2(s + j, sa, sb);
    d0 = at::vec::fmadd(ga * V::loadu(w + j), sa, d0);
    d1 = at::vec::fmadd(gb * V::loadu(w + j + kN), sb, d1);
  }
  acc dot = lane_sum(d0 + d1);
  for (; j < C; ++j) dot += acc(dy[j]) * w[j] * acc(s[j]);
  const acc c = r * r * r * dot / acc(C);
  const V rv(r), cv(c);
  j = 0;
  for (; j + kS <= C; j += kS) {
    V ga, gb, sa, sb;
    load2(dy + j, ga, gb);
    load2(s + j, sa, sb);
    const V w0 = V::loadu(w + j), w1 = V::loadu(w + j + kN);
    V xa = rv * ga * w0 - sa * cv, xb = rv * gb * w1 - sb * cv;
    if (gres != nullptr) {
      V ra, rb;
      load2(gres + j, ra, rb);
      xa = xa + ra;
      xb = xb + rb;
    }
    store2(dx + j, xa, xb);
    at::vec::fmadd(ga * sa, rv, V::loadu(dw + j)).store(dw + j);
    at::vec::fmadd(gb * sb, rv, V::loadu(dw + j + kN)).store(dw + j + kN);
  }
  for (; j < C; ++j) {
    acc v = r * acc(dy[j]) * w[j] - acc(s[j]) * c;
    if (gres != nullptr) v += acc(gres[j]);
    dx[j] = x_t(v);
    dw[j] += acc(dy[j]) * acc(s[j]) * r;
  }
}

// Threads: the rows are cut into p.blocks fixed blocks (at::parallel_for over blocks); block b
// sums its rows' weight gradients into dw_partial[b]; then the blocks are added in order into
// dw_partial[0].
template <typename x_t, typename o_t>
void rms_norm_bwd_impl(const RmsNormBwdParams& p) {
  using acc = acc_t<x_t>;
  const auto* dy = static_cast<const o_t*>(p.grad_out);   // [rows, C] by go_rows
  const auto* x = static_cast<const x_t*>(p.x);           // [rows, C] by x_rows
  const auto* gres = static_cast<const x_t*>(p.grad_res);  // [rows, C] by gr_rows, or null
  const auto* w = static_cast<const acc*>(p.weight);      // [C]
  const auto* rstd = static_cast<const acc*>(p.rstd);     // [rows]
  auto* dx = static_cast<x_t*>(p.dx);                     // [rows, C] contiguous
  auto* part = static_cast<acc*>(p.dw_partial);           // [blocks, C], zeroed
  const int64_t C = p.C, per = (p.rows + p.blocks - 1) / p.blocks;
  at::parallel_for(0, p.blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t r = b * per; r < std::min(p.rows, (b + 1) * per); ++r) {
        norm_bwd_row<x_t, o_t>(dy + p.go_rows.offset(r), x + p.x_rows.offset(r), w, rstd[r],
                               gres ? gres + p.gr_rows.offset(r) : nullptr, dx + r * C,
                               part + b * C, C);
      }
    }
  });
  for (int64_t b = 1; b < p.blocks; ++b)
    for (int64_t j = 0; j < C; ++j) part[j] += part[b * C + j];
}

template <template <typename, typename> class Fn, typename Params>
void dispatch(const Params& p, const char* op) {
  using c10::ScalarType;
  const ScalarType x = p.x_dtype, o = p.out_dtype;
  if (x == ScalarType::Float && o == ScalarType::Float) return Fn<float, float>::run(p);
  if (x == ScalarType::Float && o == ScalarType::BFloat16) return Fn<float, c10::BFloat16>::run(p);
  if (x == ScalarType::Float && o == ScalarType::Half) return Fn<float, c10::Half>::run(p);
  if (x == ScalarType::BFloat16 && o == x) return Fn<c10::BFloat16, c10::BFloat16>::run(p);
  if (x == ScalarType::Half && o == x) return Fn<c10::Half, c10::Half>::run(p);
  if (x == ScalarType::Double && o == x) return Fn<double, double>::run(p);
  TORCH_CHECK(false, op, ": unsupported dtypes ", x, " -> ", o);
}

template <typename x_t, typename o_t>
struct Fwd {
  static void run(const RmsNormParams& p) { rms_norm_fwd_impl<x_t, o_t>(p); }
};
template <typename x_t, typename o_t>
struct Bwd {
  static void run(const RmsNormBwdParams& p) { rms_norm_bwd_impl<x_t, o_t>(p); }
};

void rms_norm_fwd_kernel(const RmsNormParams& p) { dispatch<Fwd>(p, "rms_norm"); }
void rms_norm_bwd_kernel(const RmsNormBwdParams& p) { dispatch<Bwd>(p, "rms_norm_backward"); }

}  // namespace
GPTMOD_REGISTER_KERNEL(rms_norm_fwd_stub, rms_norm_fwd_kernel);
GPTMOD_REGISTER_KERNEL(rms_norm_bwd_stub, rms_norm_bwd_kernel);
}  // namespace gptmod
