// The end of a matvec tile in the AVX-512 extension objects (csrc/cpu/bf16/, csrc/cpu/vnni/): RB
// rows x NB blocks of 16 fp32 outputs stored into y, the last block masked at M, added to y when
// the product accumulates. Only for files compiled with AVX-512 flags, called after the cpuid check.
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "gptmod/decode_step.h"

#if !defined(__AVX512F__)
#error "avx512_tile.h is for the objects compiled with AVX-512 flags"
#endif

namespace gptmod {

template <int RB, int NB>
inline void store_tile_avx512(const MatvecParams& p, int64_t r0, int64_t n0, __m512 (&acc)[RB][NB]) {
  for (int r = 0; r < RB; ++r) {
    float* y = p.y + (r0 + r) * p.ldy;
    for (int n = 0; n < NB; ++n) {
      const int64_t j0 = (n0 + n) * kPackBlock;
      const int64_t cnt = std::min<int64_t>(kPackBlock, p.M - j0);
      const __mmask16 m = cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cnt) - 1);
      __m512 v = acc[r][n];
      if (p.accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, y + j0));
      _mm512_mask_storeu_ps(y + j0, m, v);
    }
  }
}

}  // namespace gptmod
