// The bf16 matrix-vector product with AVX512-BF16's vdpbf16ps (two bf16 products summed into
// each fp32 lane per instruction). Compiled once, with -mavx512bf16, outside the per-capability
// builds: ATen's capability levels have no BF16 step, so this file gets its own object and the
// caller checks cpuid at run time (bf16dp_enabled) before using it. x is rounded to bf16 pairs
// first (the operand type of the instruction, vcvtneps2bf16: nearest even); accumulation stays fp32.
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gptmod/avx512_tile.h"
#include "gptmod/decode_step.h"

#if !defined(__AVX512BF16__)
#error "matvec_bf16dp_kernel.cpp must be compiled with -mavx512bf16"
#endif

namespace gptmod {
namespace {

// RB rows x NB blocks; xp[r][q] holds bf16(x[r, 2q]) | bf16(x[r, 2q+1]) << 16.
template <int RB, int NB>
void tile(const MatvecParams& p, const uint32_t* xp, int64_t P, int64_t r0, int64_t n0) {
  const auto* w = static_cast<const uint16_t*>(p.w);
  __m512 acc[RB][NB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t q = 0; q < P; ++q) {
    __m512i xs[RB];
    for (int r = 0; r < RB; ++r) xs[r] = _mm512_set1_epi32(int(xp[(r0 + r) * P + q]));
    for (int n = 0; n < NB; ++n) {
      const __m512i wv = _mm512_loadu_si512(w + ((n0 + n) * P + q) * 2 * kPackBlock);
      for (int r = 0; r < RB; ++r)
        acc[r][n] = _mm512_dpbf16_ps(acc[r][n], (__m512bh)wv, (__m512bh)xs[r]);
    }
  }
  store_tile_avx512<RB, NB>(p, r0, n0, acc);
}

template <int RB, int NB>
void rows_tile(const MatvecParams& p, const uint32_t* xp, int64_t P, int64_t r0, int64_t b0,
               int64_t b1) {
  int64_t n = b0;
  for (; n + NB <= b1; n += NB) tile<RB, NB>(p, xp, P, r0, n);
  for (; n < b1; ++n) tile<RB, 1>(p, xp, P, r0, n);
}

void matvec_bf16dp_kernel(const MatvecParams& p) {
  // x as bf16, rounded to nearest even, in input order: the pairs of xp, a zero past an odd K.
  const int64_t P = (p.K + 1) / 2;
  std::vector<uint32_t> xp(p.N * P);
  for (int64_t r = 0; r < p.N; ++r) {
    const float* xr = p.x + r * p.ldx;
    auto* dst = reinterpret_cast<uint16_t*>(xp.data() + r * P);
    for (int64_t k = 0; k < 2 * P; k += 16) {
      const int64_t cnt = std::min<int64_t>(16, p.K - k);
      const __mmask16 m = __mmask16((1u << cnt) - 1);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, xr + k));
      _mm256_mask_storeu_epi16(dst + k, __mmask16((1u << std::min<int64_t>(16, 2 * P - k)) - 1),
                               (__m256i)v);
    }
  }
  const int64_t nblk = (p.M + kPackBlock - 1) / kPackBlock;
  // Tiles as in the fp32 kernel: NB shrinks as RB grows so RB x NB accumulators, RB broadcasts
  // and NB weight vectors fit the 32 registers.
  at::parallel_for(0, nblk, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0; c0 < b1; c0 += 4) {  // every row tile over 4 blocks, then the next 4
      const int64_t c1 = std::min(c0 + 4, b1);
      int64_t r = 0;
      for (; r + 8 <= p.N; r += 8) rows_tile<8, 2>(p, xp.data(), P, r, c0, c1);
      for (; r + 4 <= p.N; r += 4) rows_tile<4, 4>(p, xp.data(), P, r, c0, c1);
      for (; r + 2 <= p.N; r += 2) rows_tile<2, 4>(p, xp.data(), P, r, c0, c1);
      for (; r < p.N; ++r) rows_tile<1, 4>(p, xp.data(), P, r, c0, c1);
    }
  });
}

const int registered = [] {
  matvec_bf16dp_kernel_ptr = &matvec_bf16dp_kernel;
  return 0;
}();

}  // namespace
}  // namespace gptmod
