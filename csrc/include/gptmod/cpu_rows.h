// Row kernels shared by the per-capability CPU kernel files (csrc/cpu/kernels/*.cpp): each
// formula vectorized once here and called by its op's kernel and by the fused decode step
// (decode_step_kernel.cpp), so the two cannot drift apart. Like vec_utils.h everything lives in
// the inline namespace CPU_CAPABILITY. Scalar tails use the math of gptmod/elementwise_math.h,
// which the CUDA kernels use for every element.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "gptmod/elementwise_math.h"
#include "gptmod/vec_utils.h"

namespace gptmod::vec {
inline namespace CPU_CAPABILITY {

// Rotates one head row of D elements: x row -> out row (possibly the same memory).
//   half-split:  pairs (i, i + D/2), i < D/2
//   interleaved: pairs (2i, 2i + 1), i < D/2
// c, s: this token's cos/sin rows [D/2]; s is applied with sign `sgn` (-1 for the inverse).
// Reads each x element once and writes each out element once; in place is safe because every
// element is loaded before its slot is stored.
template <typename scalar_t, bool kInterleaved>
inline void rope_row(const scalar_t* x,                   // [D]; not restrict: out may alias it
                     scalar_t* out,                       // [D]; may alias x
                     const acc_t<scalar_t>* __restrict__ c,  // [D/2]
                     const acc_t<scalar_t>* __restrict__ s,  // [D/2]
                     int64_t D, acc_t<scalar_t> sgn) {
  using acc = acc_t<scalar_t>;
  using V = AVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;  // pairs per main-loop iteration
  const int64_t half = D / 2;
  const V vsgn(sgn);
  int64_t i = 0;
  if constexpr (!kInterleaved) {
    for (; i + kS <= half; i += kS) {
      V x1a, x1b, x2a, x2b, ca, cb, sa, sb;
      load2(x + i, x1a, x1b);
      load2(x + half + i, x2a, x2b);
      load2(c + i, ca, cb);
      load2(s + i, sa, sb);
      sa = sa * vsgn;
      sb = sb * vsgn;
      store2(out + i, x1a * ca - x2a * sa, x1b * cb - x2b * sb);
      store2(out + half + i, x2a * ca + x1a * sa, x2b * cb + x1b * sb);
    }
    if (i + kS / 2 <= half) {
      const V x1 = load1(x + i), x2 = load1(x + half + i);
      const V cv = load1(c + i), sv = load1(s + i) * vsgn;
      store1(out + i, x1 * cv - x2 * sv);
      store1(out + half + i, x2 * cv + x1 * sv);
      i += kS / 2;
    }
    for (; i < half; ++i) {
      acc y1, y2;
      rope_pair<acc>(acc(x[i]), acc(x[half + i]), c[i], sgn * s[i], y1, y2);
      out[i] = scalar_t(y1);
      out[half + i] = scalar_t(y2);
    }
  } else {
    // kS pairs = 2 kS elements = four accumulation vectors; deinterleave2 splits the even
    // (x1) and odd (x2) lanes, interleave2 puts the results back.
    for (; i + kS <= half; i += kS) {
      V v0, v1, v2, v3, ca, cb, sa, sb;
      load2(x + 2 * i, v0, v1);
      load2(x + 2 * i + kS, v2, v3);
      load2(c + i, ca, cb);
      load2(s + i, sa, sb);
      sa = sa * vsgn;
      sb = sb * vsgn;
      auto [x1a, x2a] = at::vec::deinterleave2(v0, v1);
      auto [x1b, x2b] = at::vec::deinterleave2(v2, v3);
      auto [o0, o1] = at::vec::interleave2(V(x1a * ca - x2a * sa), V(x2a * ca + x1a * sa));
      auto [o2, o3] = at::vec::interleave2(V(x1b * cb - x2b * sb), V(x2b * cb + x1b * sb));
      store2(out + 2 * i, o0, o1);
      store2(out + 2 * i + kS, o2, o3);
    }
    if (i + kS / 2 <= half) {
      V v0, v1;
      load2(x + 2 * i, v0, v1);
      const V cv = load1(c + i), sv = load1(s + i) * vsgn;
      auto [x1, x2] = at::vec::deinterleave2(v0, v1);
      auto [o0, o1] = at::vec::interleave2(V(x1 * cv - x2 * sv), V(x2 * cv + x1 * sv));
      store2(out + 2 * i, o0, o1);
      i += kS / 2;
    }
    for (; i < half; ++i) {
      acc y1, y2;
      rope_pair<acc>(acc(x[2 * i]), acc(x[2 * i + 1]), c[i], sgn * s[i], y1, y2);
      out[2 * i] = scalar_t(y1);
      out[2 * i + 1] = scalar_t(y2);
    }
  }
}

// o[j] = silu(g[j]) * u[j], j < F: one row of swiglu (gate and up rows of one token).
template <typename scalar_t>
inline void swiglu_row(const scalar_t* __restrict__ g,  // [F]
                       const scalar_t* __restrict__ u,  // [F]
                       scalar_t* __restrict__ o,        // [F]
                       int64_t F) {
  using acc = acc_t<scalar_t>;
  using V = AVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  int64_t j = 0;
  for (; j + kS <= F; j += kS) {
    V ga, gb, ua, ub;
    load2(g + j, ga, gb);
    load2(u + j, ua, ub);
    store2(o + j, ga * vsigmoid(ga) * ua, gb * vsigmoid(gb) * ub);
  }
  if (j + kS / 2 <= F) {
    const V gv = load1(g + j);
    store1(o + j, gv * vsigmoid(gv) * load1(u + j));
    j += kS / 2;
  }
  for (; j < F; ++j) o[j] = scalar_t(swiglu_fwd<acc>(acc(g[j]), acc(u[j])));
}

// s[j] = cap * tanh(s[j] / cap), j < n, in place (Gemma 2's soft-cap of attention scores and of
// logits; attention_softcap in gptmod/decode_attention_common.h is the scalar twin on CUDA).
template <typename acc_t>
inline void softcap_row(acc_t* s,  // [n]
                        int64_t n, acc_t cap) {
  using V = at::vec::Vectorized<acc_t>;
  const acc_t inv_cap = acc_t(1) / cap;
  at::vec::map([cap, inv_cap](V v) { return vtanh(v * V(inv_cap)) * V(cap); }, s, s, n);
}

}  // namespace CPU_CAPABILITY
}  // namespace gptmod::vec
