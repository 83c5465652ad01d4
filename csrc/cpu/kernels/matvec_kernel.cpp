// Matrix-vector products y = x @ W^T for decode shapes (a few rows x, weights packed once: see
// gptmod/decode_step.h), compiled once per CPU capability. Decoding a token reads every weight
// once per step, so these kernels are written to stream the packed blocks at memory speed:
// each weight vector is loaded once and used for up to 8 rows of x.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>

#include "gptmod/decode_step.h"

namespace gptmod {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kVS = Vec::size();
constexpr int kVPB = kPackBlock / kVS;  // vectors per 16-output block
static_assert(kPackBlock % kVS == 0);

// Stores RB rows x NB blocks of accumulators into y, the last block cut at M.
template <int RB, int NB>
inline void store_tile(const MatvecParams& p, int64_t r0, int64_t n0, Vec (&acc)[RB][NB * kVPB]) {
  for (int r = 0; r < RB; ++r) {
    float* y = p.y + (r0 + r) * p.ldy;
    for (int n = 0; n < NB; ++n) {
      alignas(64) float buf[kPackBlock];
      for (int v = 0; v < kVPB; ++v) acc[r][n * kVPB + v].store(buf + v * kVS);
      const int64_t j0 = (n0 + n) * kPackBlock;
      const int64_t cnt = std::min<int64_t>(kPackBlock, p.M - j0);
      for (int64_t j = 0; j < cnt; ++j) y[j0 + j] = p.accumulate ? y[j0 + j] + buf[j] : buf[j];
    }
  }
}

// fp32 weights [nblk, K, 16]: for each input k, one weight vector per block times x[r, k].
template <int RB, int NB>
void tile_f32(const MatvecParams& p, int64_t r0, int64_t n0) {
  const float* w = static_cast<const float*>(p.w);
  Vec acc[RB][NB * kVPB];
  for (auto& row : acc)
    for (auto& a : row) a = Vec(0.f);
  const float* wb[NB];
  for (int n = 0; n < NB; ++n) wb[n] = w + (n0 + n) * p.K * kPackBlock;
  for (int64_t k = 0; k < p.K; ++k) {
    Vec xs[RB];
    for (int r = 0; r < RB; ++r) xs[r] = Vec(p.x[(r0 + r) * p.ldx + k]);
    for (int n = 0; n < NB; ++n)
      for (int v = 0; v < kVPB; ++v) {
        const Vec wv = Vec::loadu(wb[n] + k * kPackBlock + v * kVS);
        for (int r = 0; r < RB; ++r)
          acc[r][n * kVPB + v] = at::vec::fmadd(xs[r], wv, acc[r][n * kVPB + v]);
      }
  }
  store_tile<RB, NB>(p, r0, n0, acc);
}

// bf16 weights [nblk, ceil(K/2), 32], widened to fp32 on the fly (bf16 -> fp32 is a 16-bit
// shift): the even lanes hold input 2p, the odd lanes input 2p + 1.
template <int RB, int NB>
void tile_bf16(const MatvecParams& p, int64_t r0, int64_t n0) {
  const auto* w = static_cast<const c10::BFloat16*>(p.w);
  const int64_t P = (p.K + 1) / 2;
  Vec acc[RB][NB * kVPB];
  for (auto& row : acc)
    for (auto& a : row) a = Vec(0.f);
  for (int64_t q = 0; q < P; ++q) {
    Vec x0[RB], x1[RB];
    for (int r = 0; r < RB; ++r) {
      const float* xr = p.x + (r0 + r) * p.ldx;
      x0[r] = Vec(xr[2 * q]);
      x1[r] = Vec(2 * q + 1 < p.K ? xr[2 * q + 1] : 0.f);
    }
    for (int n = 0; n < NB; ++n) {
      const c10::BFloat16* src = w + ((n0 + n) * P + q) * 2 * kPackBlock;
      for (int v = 0; v < kVPB; ++v) {
        alignas(64) float even[kVS], odd[kVS];
        for (int j = 0; j < kVS; ++j) {
          even[j] = float(src[2 * (v * kVS + j)]);
          odd[j] = float(src[2 * (v * kVS + j) + 1]);
        }
        const Vec we = Vec::loadu(even), wo = Vec::loadu(odd);
        for (int r = 0; r < RB; ++r) {
          Vec& a = acc[r][n * kVPB + v];
          a = at::vec::fmadd(x1[r], wo, at::vec::fmadd(x0[r], we, a));
        }
      }
    }
  }
  store_tile<RB, NB>(p, r0, n0, acc);
}

template <int RB, int NB>
void tile(const MatvecParams& p, bool bf16, int64_t r0, int64_t n0) {
  bf16 ? tile_bf16<RB, NB>(p, r0, n0) : tile_f32<RB, NB>(p, r0, n0);
}

// Rows in tiles of 8/4/2/1 (each weight load feeds every row of a tile); blocks of outputs in
// groups, more of them when there are few rows (independent accumulators hide FMA latency).
template <int RB, int NB>
void rows_tile(const MatvecParams& p, bool bf16, int64_t r0, int64_t b0, int64_t b1) {
  int64_t n = b0;
  for (; n + NB <= b1; n += NB) tile<RB, NB>(p, bf16, r0, n);
  for (; n < b1; ++n) tile<RB, 1>(p, bf16, r0, n);
}

void matvec_impl(const MatvecParams& p, bool bf16) {
  const int64_t nblk = (p.M + kPackBlock - 1) / kPackBlock;
  // Threads split the output blocks: each reads its own share of the weights once.
  at::parallel_for(0, nblk, 4, [&](int64_t b0, int64_t b1) {
    int64_t r = 0;
    for (; r + 8 <= p.N; r += 8) rows_tile<8, 1>(p, bf16, r, b0, b1);
    for (; r + 4 <= p.N; r += 4) rows_tile<4, 2>(p, bf16, r, b0, b1);
    for (; r + 2 <= p.N; r += 2) rows_tile<2, 2>(p, bf16, r, b0, b1);
    for (; r < p.N; ++r) rows_tile<1, 4>(p, bf16, r, b0, b1);
  });
}

void matvec_f32_kernel(const MatvecParams& p) { matvec_impl(p, false); }
void matvec_bf16_kernel(const MatvecParams& p) { matvec_impl(p, true); }

}  // namespace

GPTMOD_REGISTER_KERNEL(matvec_f32_stub, matvec_f32_kernel);
GPTMOD_REGISTER_KERNEL(matvec_bf16_stub, matvec_bf16_kernel);

}  // namespace gptmod
