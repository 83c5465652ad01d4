// The row layout of a [..., n] tensor whose leading dims collapse to at most two strided dims
// (gptmod/elementwise_args.h: row_layout, with_row_layout), shared by the ops that work row by
// row (swiglu, rms_norm, cross_entropy) on CPU and CUDA. No torch headers.
#pragma once
#include <cstdint>

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

}  // namespace gptmod
