// CPU kernel of rope / rope_ (docs/design.md section 2), compiled once per CPU capability.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "gptmod/elementwise_math.h"
#include "gptmod/rope.h"
#include "gptmod/vec_utils.h"

namespace gptmod {
namespace {

using namespace gptmod::vec;

// Rotates one head row of D elements: x row -> out row (possibly the same memory).
//   half-split:  pairs (i, i + D/2), i < D/2
//   interleaved: pairs (2i, 2i + 1), i < D/2
// c, s: this token's cos/sin rows [D/2]; s is applied with sign `sgn` (-1 for the inverse).
// Reads each x element once and writes each out element once; in place is safe because every
// element is loaded before its slot is stored.
template <typename scalar_t, bool kInterleaved>
inline void rope_row(const scalar_t* x,                   // [D]; not restrict: out may alias it
                     scalar_t* out,                       // [D]; may alias x
                     const acc_t<scalar_t>* __restrict__ c,  // [D/2]
                     const acc_t<scalar_t>* __restrict__ s,  // [D/2]
                     int64_t D, acc_t<scalar_t> sgn) {
  using acc = acc_t<scalar_t>;
  using V = AVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;  // pairs per main-loop iteration
  const int64_t half = D / 2;
  const V vsgn(sgn);
  int64_t i = 0;
  if constexpr (!kInterleaved) {
    for (; i + kS <= half; i += kS) {
      V x1a, x1b, x2a, x2b, ca, cb, sa, sb;
      load2(x + i, x1a, x1b);
      load2(x + half + i, x2a, x2b);
      load2(c + i, ca, cb);
      load2(s + i, sa, sb);
      sa = sa * vsgn;
      sb = sb * vsgn;
      store2(out + i, x1a * ca - x2a * sa, x1b * cb - x2b * sb);
      store2(out + half + i, x2a * ca + x1a * sa, x2b * cb + x1b * sb);
    }
    if (i + kS / 2 <= half) {
      const V x1 = load1(x + i), x2 = load1(x + half + i);
      const V cv = load1(c + i), sv = load1(s + i) * vsgn;
      store1(out + i, x1 * cv - x2 * sv);
      store1(out + half + i, x2 * cv + x1 * sv);
      i += kS / 2;
    }
    for (; i < half; ++i) {
      acc y1, y2;
      rope_pair<acc>(acc(x[i]), acc(x[half + i]), c[i], sgn * s[i], y1, y2);
      out[i] = scalar_t(y1);
      out[half + i] = scalar_t(y2);
    }
  } else {
    // kS pairs = 2 kS elements = four accumulation vectors; deinterleave2 splits the even
    // (x1) and odd (x2) lanes, interleave2 puts the results back.
    for (; i + kS <= half; i += kS) {
      V v0, v1, v2, v3, ca, cb, sa, sb;
      load2(x + 2 * i, v0, v1);
      load2(x + 2 * i + kS, v2, v3);
      load2(c + i, ca, cb);
      load2(s + i, sa, sb);
      sa = sa * vsgn;
      sb = sb * vsgn;
      auto [x1a, x2a] = at::vec::deinterleave2(v0, v1);
      auto [x1b, x2b] = at::vec::deinterleave2(v2, v3);
      auto [o0, o1] = at::vec::interleave2(V(x1a * ca - x2a * sa), V(x2a * ca + x1a * sa));
      auto [o2, o3] = at::vec::interleave2(V(x1b * cb - x2b * sb), V(x2b * cb + x1b * sb));
      store2(out + 2 * i, o0, o1);
      store2(out + 2 * i + kS, o2, o3);
    }
    if (i + kS / 2 <= half) {
      V v0, v1;
      load2(x + 2 * i, v0, v1);
      const V cv = load1(c + i), sv = load1(s + i) * vsgn;
      auto [x1, x2] = at::vec::deinterleave2(v0, v1);
      auto [o0, o1] = at::vec::interleave2(V(x1 * cv - x2 * sv), V(x2 * cv + x1 * sv));
      store2(out + 2 * i, o0, o1);
      i += kS / 2;
    }
    for (; i < half; ++i) {
      acc y1, y2;
      rope_pair<acc>(acc(x[2 * i]), acc(x[2 * i + 1]), c[i], sgn * s[i], y1, y2);
      out[2 * i] = scalar_t(y1);
      out[2 * i + 1] = scalar_t(y2);
    }
  }
}

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
  switch (p.dtype) {
    case c10::ScalarType::Float: return rope_dispatch_layout<float>(p);
    case c10::ScalarType::Double: return rope_dispatch_layout<double>(p);
    case c10::ScalarType::Half: return rope_dispatch_layout<c10::Half>(p);
    case c10::ScalarType::BFloat16: return rope_dispatch_layout<c10::BFloat16>(p);
    default: TORCH_CHECK(false, "rope: unsupported dtype ", p.dtype);
  }
}

}  // namespace
GPTMOD_REGISTER_KERNEL(rope_stub, rope_kernel);
}  // namespace gptmod
