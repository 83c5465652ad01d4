// Parameters shared by the swiglu entry points (csrc/cpu/swiglu.cpp) and kernels.
#pragma once
#include <cstdint>
#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"

namespace gptmod {

struct SwigluParams {
  c10::ScalarType dtype;
  int64_t rows;           // product of the leading dims
  int64_t F;              // output features (gate_up has 2F)
  const void* gate_up;    // [rows, 2F], row stride gate_up_stride (elements)
  int64_t gate_up_stride;
  const void* grad_out;   // [rows, F] (backward only), row stride grad_out_stride
  int64_t grad_out_stride;
  void* out;              // forward: [rows, F]; backward: [rows, 2F]; contiguous
};

using SwigluFn = void (*)(const SwigluParams&);
GPTMOD_DECLARE_STUB(swiglu_fwd_stub, SwigluFn);
GPTMOD_DECLARE_STUB(swiglu_bwd_stub, SwigluFn);

}  // namespace gptmod
