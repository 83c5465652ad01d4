// Parameters shared by the rope entry points (csrc/cpu/rope.cpp, csrc/cuda/rope.cu) and the
// per-capability CPU kernels (csrc/cpu/kernels/rope_kernel.cpp). Light on purpose: kernel files
// are compiled three times.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"

namespace gptmod {

struct RopeParams {
  c10::ScalarType dtype;        // of x and out
  int64_t B, T, H, D;           // x: [B, T, H, D]
  const void* x;                // [B, T, H, D], strides x_sb, x_st, x_sh, 1 (elements)
  int64_t x_sb, x_st, x_sh;
  void* out;                    // [B, T, H, D], strides out_sb, out_st, out_sh, 1; may equal x
  int64_t out_sb, out_st, out_sh;
  const void* cos;              // [max_pos, D/2] of the accumulation type (float, or double
  const void* sin;              //   for double x), row strides cos_stride / sin_stride
  int64_t cos_stride, sin_stride;
  int64_t max_pos;
  const void* positions;        // nullptr (position t), [T] or [B, T] int32/int64
  bool positions_int64;
  int64_t pos_sb, pos_st;       // element strides of positions (pos_sb = 0 for [T])
  bool interleaved;             // pairs (2i, 2i + 1) instead of (i, i + D/2)
  bool inverse;                 // rotate by -theta
};

using RopeFn = void (*)(const RopeParams&);
GPTMOD_DECLARE_STUB(rope_stub, RopeFn);

}  // namespace gptmod
