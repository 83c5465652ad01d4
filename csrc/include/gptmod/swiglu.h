// Parameters shared by the swiglu entry points (csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu) and the
// per-capability CPU kernels (csrc/cpu/kernels/swiglu_kernel.cpp). Light on purpose: kernel
// files are compiled three times.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"
#include "gptmod/elementwise_math.h"
#include "gptmod/macros.h"
#include "gptmod/row_layout.h"

namespace gptmod {

struct SwigluParams {
  c10::ScalarType dtype;
  int64_t rows;            // product of the leading dims
  int64_t F;               // output features (gate_up has 2F)
  const void* gate_up;     // [rows, 2F] laid out by gate_up_rows: gate = [:, :F], up = [:, F:]
  RowLayout gate_up_rows;
  const void* grad_out;    // [rows, F] laid out by grad_out_rows (backward only)
  RowLayout grad_out_rows;
  void* out;               // forward [rows, F], backward [rows, 2F]; contiguous
};

using SwigluFn = void (*)(const SwigluParams&);
GPTMOD_DECLARE_STUB(swiglu_fwd_stub, SwigluFn);
GPTMOD_DECLARE_STUB(swiglu_bwd_stub, SwigluFn);

}  // namespace gptmod
