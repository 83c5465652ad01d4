// swiglu / swiglu_backward on CPU: argument checks, output allocation, and a call into the
// widest CPU build of the kernels (csrc/cpu/kernels/swiglu_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gptmod/elementwise_args.h"
#include "gptmod/swiglu.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(swiglu_fwd_stub, SwigluFn);
GPTMOD_DEFINE_STUB(swiglu_bwd_stub, SwigluFn);

at::Tensor swiglu_cpu(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up);
  const int64_t F = gate_up.size(-1) / 2;
  at::Tensor out = swiglu_empty_out(gate_up);
  if (out.numel() == 0) return out;
  SwigluParams p{};
  const at::Tensor gu = with_row_layout(gate_up, p.gate_up_rows);
  p.dtype = gu.scalar_type();
  p.rows = out.numel() / F;
  p.F = F;
  p.gate_up = gu.const_data_ptr();
  p.out = out.data_ptr();
  swiglu_fwd_stub.get()(p);
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& gate_up) {
  check_swiglu_args("swiglu_backward", gate_up, &grad_out);
  at::Tensor grad = at::empty(gate_up.sizes(), gate_up.options());
  if (grad.numel() == 0) return grad;
  SwigluParams p{};
  const at::Tensor gu = with_row_layout(gate_up, p.gate_up_rows);
  const at::Tensor dy = with_row_layout(grad_out, p.grad_out_rows);
  p.dtype = gu.scalar_type();
  p.F = gate_up.size(-1) / 2;
  p.rows = grad.numel() / (2 * p.F);
  p.gate_up = gu.const_data_ptr();
  p.grad_out = dy.const_data_ptr();
  p.out = grad.data_ptr();
  swiglu_bwd_stub.get()(p);
  return grad;
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace gptmod
