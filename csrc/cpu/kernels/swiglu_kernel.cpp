// PLACEHOLDER scalar kernel (to be replaced by the vectorized one).
#include <cmath>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "gptmod/swiglu.h"

namespace gptmod {
namespace {
template <typename T>
void fwd(const SwigluParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = static_cast<const T*>(p.gate_up) + r * p.gate_up_stride;
      T* o = static_cast<T*>(p.out) + r * p.F;
      for (int64_t i = 0; i < p.F; ++i) {
        float gv = float(g[i]), uv = float(g[i + p.F]);
        o[i] = T(gv / (1.f + std::exp(-gv)) * uv);
      }
    }
  });
}
void swiglu_fwd_kernel(const SwigluParams& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return fwd<float>(p);
    case c10::ScalarType::Double: return fwd<double>(p);
    case c10::ScalarType::Half: return fwd<c10::Half>(p);
    case c10::ScalarType::BFloat16: return fwd<c10::BFloat16>(p);
    default: return;
  }
}
}  // namespace
GPTMOD_REGISTER_KERNEL(swiglu_fwd_stub, swiglu_fwd_kernel);
}  // namespace gptmod
