// CPU kernel of rope / rope_ (docs/design.md section 2), compiled once per CPU capability.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "gptmod/cpu_rows.h"
#include "gptmod/dispatch.h"
#include "gptmod/rope.h"

namespace gptmod {
namespace {

using namespace gptmod::vec;

// rope over x [B, T, H, D] -> out [B, T, H, D].
// Threads: at::parallel_for over the B*T tokens; a token's position and its cos/sin rows are
// looked up once and reused for its H heads (they stay in L1). Positions were range-checked by
// the entry point.
template <typename scalar_t, bool kInterleaved>
void rope_impl(const RopeParams& p) {
  using acc = acc_t<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(p.x);         // [B, T, H, D]
  auto* out = static_cast<scalar_t*>(p.out);                  // [B, T, H, D]
  const auto* cos = static_cast<const acc*>(p.cos);           // [max_pos, D/2]
  const auto* sin = static_cast<const acc*>(p.sin);           // [max_pos, D/2]
  const auto* pos32 = static_cast<const int32_t*>(p.positions);  // [T] or [B, T]
  const auto* pos64 = static_cast<const int64_t*>(p.positions);  // [T] or [B, T]
  const acc sgn = p.inverse ? acc(-1) : acc(1);
  const int64_t tokens = p.B * p.T;
  // About 16K elements per task: below that the thread hand-off costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.H * p.D));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / p.T, t = bt % p.T;
      int64_t pos = t;
      if (p.positions != nullptr) {
        const int64_t off = b * p.pos_sb + t * p.pos_st;
        pos = p.positions_int64 ? pos64[off] : int64_t(pos32[off]);
      }
      const acc* c = cos + pos * p.cos_stride;
      const acc* s = sin + pos * p.sin_stride;
      const scalar_t* xt = x + b * p.x_sb + t * p.x_st;
      scalar_t* ot = out + b * p.out_sb + t * p.out_st;
      for (int64_t h = 0; h < p.H; ++h) {
        rope_row<scalar_t, kInterleaved>(xt + h * p.x_sh, ot + h * p.out_sh, c, s, p.D, sgn);
      }
    }
  });
}

template <typename scalar_t>
void rope_dispatch_layout(const RopeParams& p) {
  if (p.interleaved) {
    rope_impl<scalar_t, true>(p);
  } else {
    rope_impl<scalar_t, false>(p);
  }
}

void rope_kernel(const RopeParams& p) {
  GPTMOD_DISPATCH_FLOATING_TYPES(p.dtype, "rope", [&] { rope_dispatch_layout<scalar_t>(p); });
}

}  // namespace
GPTMOD_REGISTER_KERNEL(rope_stub, rope_kernel);
}  // namespace gptmod
