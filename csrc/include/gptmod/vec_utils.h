// Loads and stores of at::vec::Vectorized in the accumulation type, for kernel files only
// (csrc/cpu/kernels/*.cpp, compiled once per CPU capability). Everything here lives in
// the inline namespace CPU_CAPABILITY, as ATen's own vec code does, so the three builds of a
// template never share a mangled name.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifndef CPU_CAPABILITY
#error "vec_utils.h is for kernel files, which are compiled with -DCPU_CAPABILITY=..."
#endif

namespace gptmod::vec {
inline namespace CPU_CAPABILITY {

// fp32 math for fp32/fp16/bf16, fp64 math for fp64 (gradcheck needs the full precision).
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename Acc<scalar_t>::type;
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

// Vectorized sigma(g) = 1 / (1 + exp(-g)). exp() is SLEEF's 1-ulp expf on AVX2/AVX-512 (the
// DEFAULT build maps std::exp); exp_u20 was measured ~1e-6 relative off against fp64 near
// |g| ~ 10, more than the fp32 parity bar allows, and the op is memory bound anyway.
template <typename V>
inline V vsigmoid(const V& g) {
  const V one(1);
  return one / (one + g.neg().exp());
}

}  // namespace CPU_CAPABILITY
}  // namespace gptmod::vec
