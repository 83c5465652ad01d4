// Parameters shared by the swiglu entry points (csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu) and the
// per-capability CPU kernels (csrc/cpu/kernels/swiglu_kernel.cpp). Light on purpose: kernel
// files are compiled three times.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"
#include "gptmod/elementwise_math.h"
#include "gptmod/macros.h"

namespace gptmod {

// Rows of a [..., n] tensor whose leading dims collapse to at most two (outer, inner): row r
// starts at (r / inner) * outer_stride + (r % inner) * inner_stride elements. Covers contiguous
// tensors, 2-D row-strided views and 3-D views such as a slice of a bigger batch, without a copy.
struct RowLayout {
  int64_t inner = 1;          // rows per outer step
  int64_t outer_stride = 0;   // elements
  int64_t inner_stride = 0;   // elements

  GPTMOD_HD int64_t offset(int64_t r) const {
    return inner == 1 ? r * outer_stride : (r / inner) * outer_stride + (r % inner) * inner_stride;
  }
};

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
