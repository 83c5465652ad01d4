// Scalar math shared by the CPU kernels (their tails) and the CUDA kernels (every element), so
// both backends compute the same formulas in the same order.
#pragma once

#include <cmath>

#include "gptmod/macros.h"

namespace gptmod {

// Rotation of one pair (x1, x2) by the angle whose cosine and sine are c and s (s already
// negated for the inverse rotation): y1 = x1 c - x2 s, y2 = x2 c + x1 s.
template <typename acc_t>
GPTMOD_HD void rope_pair(acc_t x1, acc_t x2, acc_t c, acc_t s, acc_t& y1, acc_t& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}

// exp overloads that resolve on host and device alike; expf rather than __expf on the GPU
// because the fast intrinsic loses ~2 ulp plus range-dependent error in silu's backward.
GPTMOD_HD float gptmod_exp(float v) { return expf(v); }
GPTMOD_HD double gptmod_exp(double v) { return exp(v); }
GPTMOD_HD float gptmod_log(float v) { return logf(v); }
GPTMOD_HD double gptmod_log(double v) { return log(v); }
GPTMOD_HD float gptmod_sqrt(float v) { return sqrtf(v); }
GPTMOD_HD double gptmod_sqrt(double v) { return sqrt(v); }
GPTMOD_HD float gptmod_tanh(float v) { return tanhf(v); }
GPTMOD_HD double gptmod_tanh(double v) { return tanh(v); }

// sigma(g); for g -> -inf exp overflows to inf and the quotient goes to 0, as it should.
template <typename acc_t>
GPTMOD_HD acc_t sigmoid(acc_t g) {
  return acc_t(1) / (acc_t(1) + gptmod_exp(-g));
}

// swiglu forward for one element: silu(g) * u.
template <typename acc_t>
GPTMOD_HD acc_t swiglu_fwd(acc_t g, acc_t u) {
  return g * sigmoid(g) * u;
}

// swiglu backward for one element, with s = sigma(g):
//   d_up = dout g s,   d_gate = dout u s (1 + g (1 - s)).
template <typename acc_t>
GPTMOD_HD void swiglu_bwd(acc_t dout, acc_t g, acc_t u, acc_t& d_gate, acc_t& d_up) {
  const acc_t s = sigmoid(g);
  d_up = dout * g * s;
  d_gate = dout * u * s * (acc_t(1) + g * (acc_t(1) - s));
}

}  // namespace gptmod
