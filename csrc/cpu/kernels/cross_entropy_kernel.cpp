// CPU kernels of cross_entropy / cross_entropy_backward (gptmod/cross_entropy.h), compiled once
// per CPU capability. Chunked over tokens: at::parallel_for over rows, and a row (V logits) is
// read twice in the forward (its max, then the sum of exponentials) and once in the backward,
// which writes the gradient row; nothing of size [rows, V] is made besides that gradient.
#include <limits>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "gptmod/cross_entropy.h"
#include "gptmod/vec_utils.h"

namespace gptmod {
namespace {

using namespace gptmod::vec;

inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, V));
}

inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& v) { return exp_fp32(v); }
inline at::vec::Vectorized<double> vexp(const at::vec::Vectorized<double>& v) { return v.exp(); }

// z = cap * tanh(raw / cap), lane-wise (cap > 0).
template <typename V>
inline V vcap(const V& raw, const V& cap, const V& inv_cap) {
  return cap * vtanh(raw * inv_cap);
}

// One row: returns lse. The cap is monotonic, so the max of z is the cap of the max of raw.
template <typename scalar_t>
acc_t<scalar_t> row_lse(const scalar_t* __restrict__ x, int64_t V_, acc_t<scalar_t> cap) {
  using acc = acc_t<scalar_t>;
  using V = AVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  const acc lowest = -std::numeric_limits<acc>::infinity();
  V m0(lowest), m1(lowest);
  int64_t j = 0;
  for (; j + kS <= V_; j += kS) {
    V a, b;
    load2(x + j, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  }
  acc m = lane_max(at::vec::maximum(m0, m1));
  for (; j < V_; ++j) m = std::max(m, acc(x[j]));
  const acc mz = softcap_logit<acc>(m, cap);
  const V mv(mz), cv(cap), icv(cap > 0 ? acc(1) / cap : acc(0));
  V s0(0), s1(0);
  j = 0;
  for (; j + kS <= V_; j += kS) {
    V a, b;
    load2(x + j, a, b);
    if (cap > 0) {
      a = vcap(a, cv, icv);
      b = vcap(b, cv, icv);
    }
    s0 = s0 + vexp(a - mv);
    s1 = s1 + vexp(b - mv);
  }
  acc s = lane_sum(s0 + s1);
  for (; j < V_; ++j) s += gptmod_exp(softcap_logit<acc>(acc(x[j]), cap) - mz);
  return mz + gptmod_log(s);
}

template <typename scalar_t>
void cross_entropy_fwd_impl(const CrossEntropyParams& p) {
  using acc = acc_t<scalar_t>;
  const auto* logits = static_cast<const scalar_t*>(p.logits);  // [rows, V] by logits_rows
  auto* lse = static_cast<acc*>(p.lse);                          // [rows]
  auto* row_loss = static_cast<acc*>(p.row_loss);                // [rows]
  const acc cap = acc(p.softcap);
  at::parallel_for(0, p.rows, row_grain(p.V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = logits + p.logits_rows.offset(r);
      const acc l = row_lse<scalar_t>(x, p.V, cap);
      lse[r] = l;
      const int64_t t = p.targets[r];
      row_loss[r] = t == p.ignore_index ? acc(0) : l - softcap_logit<acc>(acc(x[t]), cap);
    }
  });
}

// grad[r, j] = scale * (exp(z_j - lse) - [j == t]) * dz/draw, written row by row.
template <typename scalar_t>
void cross_entropy_bwd_impl(const CrossEntropyParams& p) {
  using acc = acc_t<scalar_t>;
  using V = AVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  const auto* logits = static_cast<const scalar_t*>(p.logits);  // [rows, V] by logits_rows
  const auto* lse = static_cast<const acc*>(p.lse);              // [rows]
  auto* grad = static_cast<scalar_t*>(p.grad);                   // [rows, V] contiguous
  const acc scale = *static_cast<const acc*>(p.scale);
  const acc cap = acc(p.softcap);
  const int64_t V_ = p.V;
  at::parallel_for(0, p.rows, row_grain(V_), [&](int64_t begin, int64_t end) {
    const V sv(scale), cv(cap), icv(cap > 0 ? acc(1) / cap : acc(0)), one(1);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = logits + p.logits_rows.offset(r);
      scalar_t* g = grad + r * V_;
      const int64_t t = p.targets[r];
      if (t == p.ignore_index) {
        std::fill(g, g + V_, scalar_t(0));
        continue;
      }
      const V lv(lse[r]);
      int64_t j = 0;
      for (; j + kS <= V_; j += kS) {
        V a, b;
        load2(x + j, a, b);
        if (cap > 0) {
          const V za = vcap(a, cv, icv), zb = vcap(b, cv, icv);
          const V da = one - za * icv * za * icv, db = one - zb * icv * zb * icv;
          store2(g + j, sv * vexp(za - lv) * da, sv * vexp(zb - lv) * db);
        } else {
          store2(g + j, sv * vexp(a - lv), sv * vexp(b - lv));
        }
      }
      for (; j < V_; ++j) {
        const acc z = softcap_logit<acc>(acc(x[j]), cap);
        g[j] = scalar_t(scale * gptmod_exp(z - lse[r]) * softcap_grad<acc>(z, cap));
      }
      // The target's own term, recomputed whole so it is rounded once.
      const acc zt = softcap_logit<acc>(acc(x[t]), cap);
      g[t] = scalar_t(scale * (gptmod_exp(zt - lse[r]) - acc(1)) * softcap_grad<acc>(zt, cap));
    }
  });
}

void cross_entropy_fwd_kernel(const CrossEntropyParams& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return cross_entropy_fwd_impl<float>(p);
    case c10::ScalarType::Double: return cross_entropy_fwd_impl<double>(p);
    case c10::ScalarType::Half: return cross_entropy_fwd_impl<c10::Half>(p);
    case c10::ScalarType::BFloat16: return cross_entropy_fwd_impl<c10::BFloat16>(p);
    default: TORCH_CHECK(false, "cross_entropy: unsupported dtype ", p.dtype);
  }
}

void cross_entropy_bwd_kernel(const CrossEntropyParams& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return cross_entropy_bwd_impl<float>(p);
    case c10::ScalarType::Double: return cross_entropy_bwd_impl<double>(p);
    case c10::ScalarType::Half: return cross_entropy_bwd_impl<c10::Half>(p);
    case c10::ScalarType::BFloat16: return cross_entropy_bwd_impl<c10::BFloat16>(p);
    default: TORCH_CHECK(false, "cross_entropy_backward: unsupported dtype ", p.dtype);
  }
}

}  // namespace
GPTMOD_REGISTER_KERNEL(cross_entropy_fwd_stub, cross_entropy_fwd_kernel);
GPTMOD_REGISTER_KERNEL(cross_entropy_bwd_stub, cross_entropy_bwd_kernel);
}  // namespace gptmod
