// Loads and stores of at::vec::Vectorized in the accumulation type, for kernel files only
// (csrc/cpu/kernels/*.cpp, compiled once per CPU capability). Everything here lives in
// the inline namespace CPU_CAPABILITY, as ATen's own vec code does, so the three builds of a
// template never share a mangled name.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "gptmod/acc_type.h"

#ifndef CPU_CAPABILITY
#error "vec_utils.h is for kernel files, which are compiled with -DCPU_CAPABILITY=..."
#endif

namespace gptmod::vec {
inline namespace CPU_CAPABILITY {

// fp32 math for fp32/fp16/bf16, fp64 math for fp64 (gptmod/acc_type.h).
using gptmod::acc_t;
template <typename scalar_t>
using AVec = at::vec::Vectorized<acc_t<scalar_t>>;

// Elements moved by one load2/store2: two accumulation-type vectors' worth.
template <typename scalar_t>
constexpr int64_t kStep = 2 * AVec<scalar_t>::size();

// Loads kStep<scalar_t> elements at p as two accumulation vectors: a = p[0, n), b = p[n, 2n).
// Reduced types go through one Vectorized<scalar_t> (which holds 2n elements) and a widening
// convert; float and double are two plain unaligned loads, so no conversion is paid for fp32.
template <typename scalar_t>
inline void load2(const scalar_t* p, AVec<scalar_t>& a, AVec<scalar_t>& b) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    a = AVec<scalar_t>::loadu(p);
    b = AVec<scalar_t>::loadu(p + AVec<scalar_t>::size());
  } else {
    static_assert(at::vec::Vectorized<scalar_t>::size() == kStep<scalar_t>);
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

template <typename scalar_t>
inline void store2(scalar_t* p, const AVec<scalar_t>& a, const AVec<scalar_t>& b) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    a.store(p);
    b.store(p + AVec<scalar_t>::size());
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

// One accumulation vector's worth (kStep / 2 elements), for the step between the two-vector main
// loop and the scalar tail (head dims like 96 leave half a main step over).
template <typename scalar_t>
inline AVec<scalar_t> load1(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    return AVec<scalar_t>::loadu(p);
  } else {
    AVec<scalar_t> v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
}

template <typename scalar_t>
inline void store1(scalar_t* p, const AVec<scalar_t>& v) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, AVec<scalar_t>::size());
  }
}

// Sum and max of a vector's lanes in lane order (the same order every time: reproducible).
template <typename V>
inline typename V::value_type lane_sum(const V& v) {
  typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type s = 0;
  for (int i = 0; i < V::size(); ++i) s += buf[i];
  return s;
}

template <typename V>
inline typename V::value_type lane_max(const V& v) {
  typename V::value_type buf[V::size()];
  v.store(buf);
  typename V::value_type m = buf[0];
  for (int i = 1; i < V::size(); ++i) m = m > buf[i] ? m : buf[i];
  return m;
}

// exp for fp32 vectors, accurate to ~1 ulp and cheaper than SLEEF's expf_u10 (which showed as
// the bottleneck of swiglu at one core: ~2 cycles per element): Cody-Waite reduction
// x = n ln2 + r with |r| <= ln2 / 2 and ln2 split in a high part exact in float and a low part,
// a degree-7 Taylor polynomial for exp(r) (truncation error r^8/8! < 6e-9, under 0.1 ulp), and
// 2^n built in the exponent bits. ATen's exp_u20 is the same scheme with one ln2 constant and a
// degree-5 polynomial, ~20 ulp; the approach follows Cephes' expf.
// x is clamped to [-87.33, 88]: 2^n then stays a normal float; below, exp underflows to
// ~1.2e-38 rather than 0, above it stops at e^88 ~ 1.7e38: both saturate sigma exactly in fp32.
inline at::vec::Vectorized<float> exp_fp32(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  x = at::vec::minimum(at::vec::maximum(x, V(-87.33654f)), V(88.0f));
  const V n = (x * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), x);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.f / 5040.f);
  p = at::vec::fmadd(p, r, V(1.f / 720.f));
  p = at::vec::fmadd(p, r, V(1.f / 120.f));
  p = at::vec::fmadd(p, r, V(1.f / 24.f));
  p = at::vec::fmadd(p, r, V(1.f / 6.f));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.f));
  p = at::vec::fmadd(p, r, V(1.f));
  const VI bits = (at::vec::convert_to_int_of_same_size(n) + VI(127)) << VI(23);
  return p * at::vec::cast<float>(bits);
}

// Vectorized sigma(g) = 1 / (1 + exp(-g)); fp64 keeps SLEEF's exp (gradcheck only).
inline at::vec::Vectorized<float> vsigmoid(const at::vec::Vectorized<float>& g) {
  const at::vec::Vectorized<float> one(1.f);
  return one / (one + exp_fp32(g.neg()));
}
inline at::vec::Vectorized<double> vsigmoid(const at::vec::Vectorized<double>& g) {
  const at::vec::Vectorized<double> one(1.0);
  return one / (one + g.neg().exp());
}

// Vectorized tanh(y) = 1 - 2 / (1 + exp(2y)) through exp_fp32: about 5x faster than
// Vectorized<float>::tanh on the AVX2 build (a soft-capped cross-entropy pass over 16 x 128 x
// 4096 logits: ~31 -> ~6 ms of tanh, one thread), absolute error ~1e-7 (it saturates to +-1
// exactly); fp64 keeps SLEEF's tanh. Every CPU soft-cap (loss, logits, attention scores) uses it.
inline at::vec::Vectorized<float> vtanh(const at::vec::Vectorized<float>& y) {
  const at::vec::Vectorized<float> one(1.f), two(2.f);
  return one - two / (one + exp_fp32(y + y));
}
inline at::vec::Vectorized<double> vtanh(const at::vec::Vectorized<double>& y) { return y.tanh(); }

}  // namespace CPU_CAPABILITY
}  // namespace gptmod::vec
