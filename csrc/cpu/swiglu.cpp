// PLACEHOLDER entry (to be completed): swiglu on CPU.
#include <ATen/ATen.h>
#include <torch/library.h>
#include "gptmod/swiglu.h"

namespace gptmod {
GPTMOD_DEFINE_STUB(swiglu_fwd_stub, SwigluFn);
GPTMOD_DEFINE_STUB(swiglu_bwd_stub, SwigluFn);

at::Tensor swiglu_cpu(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "swiglu: gate_up last dim must be even");
  auto x = gate_up.contiguous();
  auto sizes = x.sizes().vec();
  int64_t F = sizes.back() / 2;
  sizes.back() = F;
  auto out = at::empty(sizes, x.options());
  SwigluParams p{x.scalar_type(), x.numel() / std::max<int64_t>(2 * F, 1), F, x.const_data_ptr(), 2 * F, nullptr, 0, out.data_ptr()};
  swiglu_fwd_stub.get()(p);
  return out;
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) { m.impl("swiglu", &swiglu_cpu); }
}  // namespace gptmod
