// The int8 matrix-vector product with AVX512-VNNI's vpdpbusd (four u8 x s8 products summed into
// each int32 lane per instruction). Compiled once, with -mavx512vnni, outside the per-capability
// builds, like csrc/cpu/bf16/: ATen's capability levels have no VNNI step, so this file gets its
// own object and the caller (matvec_int8_kernel, csrc/cpu/kernels/matvec_kernel.cpp) checks cpuid
// at run time (vnni_enabled) first. It receives x already quantized (QuantRows).
//
// vpdpbusd multiplies unsigned bytes by signed ones. The weights are stored signed (Wq), so each
// loaded weight vector is flipped to Wq + 128 (xor 0x80, one instruction shared by every row of
// the tile) and the extra 128 * sum(xq) of a group, which depends on the row alone, is taken off
// by starting that group's int32 accumulators at -128 * sum(xq) (QuantRows::sum). The group's
// int32 sum is then exact; it is scaled by (weight scale x row scale) into fp32 accumulators.
// The idea of the compensation term is oneDNN's (u8s8 GEMMs); the layout is ours.
#include <immintrin.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "gptmod/avx512_tile.h"
#include "gptmod/decode_step.h"

#if !defined(__AVX512VNNI__)
#error "matvec_int8_vnni_kernel.cpp must be compiled with -mavx512vnni"
#endif

namespace gptmod {
namespace {

// RB rows x NB blocks over all groups.
template <int RB, int NB>
void tile(const MatvecParams& p, const QuantRows& xq, int64_t r0, int64_t n0) {
  const auto* w = static_cast<const int8_t*>(p.w);
  const int64_t G = p.group, Kp = (p.K + G - 1) / G * G, Q = Kp / kInt8Quad, ng = Kp / G;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512 acc[RB][NB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i s[RB][NB];
    for (int r = 0; r < RB; ++r) {
      const __m512i c = _mm512_set1_epi32(-128 * xq.sum[(r0 + r) * ng + g]);
      for (int n = 0; n < NB; ++n) s[r][n] = c;
    }
    for (int64_t q = g * G / kInt8Quad; q < (g + 1) * G / kInt8Quad; ++q) {
      __m512i xb[RB];
      for (int r = 0; r < RB; ++r) {
        int32_t quad;
        std::memcpy(&quad, xq.q + (r0 + r) * Kp + q * kInt8Quad, sizeof(quad));
        xb[r] = _mm512_set1_epi32(quad);
      }
      for (int n = 0; n < NB; ++n) {
        const __m512i wv = _mm512_xor_si512(
            _mm512_loadu_si512(w + ((n0 + n) * Q + q) * kInt8Quad * kPackBlock), flip);
        for (int r = 0; r < RB; ++r) s[r][n] = _mm512_dpbusd_epi32(s[r][n], wv, xb[r]);
      }
    }
    for (int n = 0; n < NB; ++n) {
      const __m512 sw = _mm512_loadu_ps(p.scales + ((n0 + n) * ng + g) * kPackBlock);
      for (int r = 0; r < RB; ++r) {
        const __m512 d = _mm512_mul_ps(sw, _mm512_set1_ps(xq.scale[(r0 + r) * ng + g]));
        acc[r][n] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s[r][n]), acc[r][n]);
      }
    }
  }
  store_tile_avx512<RB, NB>(p, r0, n0, acc);
}

// NB shrinks as RB grows so the int32 and fp32 accumulators (2 x RB x NB), the RB broadcasts of
// x and the NB weight vectors fit the 32 registers.
template <int RB, int NB>
void rows_tile(const MatvecParams& p, const QuantRows& xq, int64_t r0, int64_t b0, int64_t b1) {
  int64_t n = b0;
  for (; n + NB <= b1; n += NB) tile<RB, NB>(p, xq, r0, n);
  for (; n < b1; ++n) tile<RB, 1>(p, xq, r0, n);
}

void matvec_int8_vnni_kernel(const MatvecParams& p, const QuantRows& xq) {
  const int64_t nblk = (p.M + kPackBlock - 1) / kPackBlock;
  at::parallel_for(0, nblk, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0; c0 < b1; c0 += 4) {  // every row tile over 4 blocks, then the next 4
      const int64_t c1 = std::min(c0 + 4, b1);
      int64_t r = 0;
      for (; r + 8 <= p.N; r += 8) rows_tile<8, 1>(p, xq, r, c0, c1);
      for (; r + 4 <= p.N; r += 4) rows_tile<4, 2>(p, xq, r, c0, c1);
      for (; r + 2 <= p.N; r += 2) rows_tile<2, 4>(p, xq, r, c0, c1);
      for (; r < p.N; ++r) rows_tile<1, 4>(p, xq, r, c0, c1);
    }
  });
}

const int registered = [] {
  matvec_int8_vnni_kernel_ptr = &matvec_int8_vnni_kernel;
  return 0;
}();

}  // namespace
}  // namespace gptmod
