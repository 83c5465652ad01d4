// Matrix-vector products y = x @ W^T for decode shapes (a few rows x, weights packed once: see
// gptmod/decode_step.h), compiled once per CPU capability. Decoding a token reads every weight
// once per step, so these kernels are written to stream the packed blocks at memory speed: each
// weight vector is loaded (and widened) once and used for every row of a tile of up to 8 rows of x.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gptmod/decode_step.h"
#include "gptmod/quant.h"

namespace gptmod {
namespace {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int kVS = Vec::size();
constexpr int kVPB = kPackBlock / kVS;  // vectors per 16-output block
static_assert(kPackBlock % kVS == 0 && IVec::size() == kVS);

// Vector registers: 32 with AVX-512, 16 with AVX2 (DEFAULT's 8-float vectors take two of its 16
// SSE registers each, so it gets less than it asks for; it is the fallback).
constexpr int kRegs = kVPB == 1 ? 32 : 16;

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

template <int RB, int NB>
inline void zero(Vec (&acc)[RB][NB * kVPB]) {
  for (auto& row : acc)
    for (auto& a : row) a = Vec(0.f);
}

// fp32 weights [nblk, K, 16]: for each input k, one weight vector per block times x[r, k].
template <int RB, int NB>
void tile_f32(const MatvecParams& p, const void*, int64_t r0, int64_t n0) {
  const float* w = static_cast<const float*>(p.w);
  Vec acc[RB][NB * kVPB];
  zero<RB, NB>(acc);
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

// bf16 weights [nblk, ceil(K/2), 32], widened to fp32 on the fly: each 32-bit lane holds the pair
// (input 2p in its low half, 2p + 1 in its high half) of one output, and a bf16 is the high half
// of its fp32, so a shift and a mask give the two fp32 vectors.
template <int RB, int NB>
void tile_bf16(const MatvecParams& p, const void*, int64_t r0, int64_t n0) {
  const auto* w = static_cast<const uint16_t*>(p.w);
  const int64_t P = (p.K + 1) / 2;
  const IVec high_mask(int32_t(0xFFFF0000u)), sixteen(16);
  Vec acc[RB][NB * kVPB];
  zero<RB, NB>(acc);
  for (int64_t q = 0; q < P; ++q) {
    Vec x0[RB], x1[RB];
    for (int r = 0; r < RB; ++r) {
      const float* xr = p.x + (r0 + r) * p.ldx;
      x0[r] = Vec(xr[2 * q]);
      x1[r] = Vec(2 * q + 1 < p.K ? xr[2 * q + 1] : 0.f);
    }
    for (int n = 0; n < NB; ++n)
      for (int v = 0; v < kVPB; ++v) {
        const IVec pairs = IVec::loadu(w + ((n0 + n) * P + q) * 2 * kPackBlock + v * 2 * kVS);
        const Vec we = at::vec::cast<float>(pairs << sixteen);
        const Vec wo = at::vec::cast<float>(pairs & high_mask);
        for (int r = 0; r < RB; ++r) {
          Vec& a = acc[r][n * kVPB + v];
          a = at::vec::fmadd(x1[r], wo, at::vec::fmadd(x0[r], we, a));
        }
      }
  }
  store_tile<RB, NB>(p, r0, n0, acc);
}

// int8 weights [nblk, Kp/4, 64] over rows quantized the same way (xf: the quantized rows as
// floats, [N, Kp]). Within a group every product and partial sum is an integer below 2^24, so the
// fp32 sums are exact and equal the int32 sums of the VNNI kernel; each group's sum is then scaled
// by (weight scale x row scale) into the fp32 accumulators, in the VNNI kernel's order. The four
// inputs of a lane are its four bytes, sign-extended one at a time by a left then an arithmetic
// right shift (one widened weight vector live at a time: the accumulators need the registers).
template <int RB, int NB>
void tile_int8(const MatvecParams& p, const void* ctx, int64_t r0, int64_t n0) {
  const auto& [xq, xf] = *static_cast<const std::pair<const QuantRows*, const float*>*>(ctx);
  const auto* w = static_cast<const int8_t*>(p.w);
  const int64_t G = p.group, Kp = (p.K + G - 1) / G * G, Q = Kp / kInt8Quad, ng = Kp / G;
  Vec acc[RB][NB * kVPB];
  zero<RB, NB>(acc);
  for (int64_t g = 0; g < ng; ++g) {
    Vec gs[RB][NB * kVPB];
    zero<RB, NB>(gs);
    for (int64_t q = g * G / kInt8Quad; q < (g + 1) * G / kInt8Quad; ++q)
      for (int n = 0; n < NB; ++n)
        for (int v = 0; v < kVPB; ++v) {
          const IVec quad = IVec::loadu(w + ((n0 + n) * Q + q) * kInt8Quad * kPackBlock + v * kInt8Quad * kVS);
          for (int i = 0; i < kInt8Quad; ++i) {
            const Vec wi = at::vec::convert_to_fp_of_same_size<float>(
                (quad << IVec(24 - 8 * i)) >> IVec(24));
            for (int r = 0; r < RB; ++r) {
              Vec& a = gs[r][n * kVPB + v];
              a = at::vec::fmadd(Vec(xf[(r0 + r) * Kp + q * kInt8Quad + i]), wi, a);
            }
          }
        }
    for (int n = 0; n < NB; ++n)
      for (int v = 0; v < kVPB; ++v) {
        const Vec sw = Vec::loadu(p.scales + ((n0 + n) * ng + g) * kPackBlock + v * kVS);
        for (int r = 0; r < RB; ++r) {
          Vec& a = acc[r][n * kVPB + v];
          a = at::vec::fmadd(sw * Vec(xq->scale[(r0 + r) * ng + g]), gs[r][n * kVPB + v], a);
        }
      }
  }
  store_tile<RB, NB>(p, r0, n0, acc);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The int8 tile with AVX2 integer instructions (the AVX2 and AVX512 builds without VNNI): the same
// integer sums as vpdpbusd, by the route of llama.cpp's AVX2 int8 dot products. vpmaddubsw
// multiplies unsigned by signed bytes and adds pairs into int16 with saturation, so it gets |w|
// (<= 127) and x with w's sign (vpsignb): a pair adds to at most 2 * 127 * 127 < 2^15, exact;
// vpmaddwd by ones then adds the pairs of a lane's quad into int32. Each 256-bit vector is 8
// outputs x one quad of inputs. The fp32 totals change once per group, so they live in memory.
template <int RB, int NB>
void tile_int8_avx2(const MatvecParams& p, const void* ctx, int64_t r0, int64_t n0) {
  const QuantRows& xq = *static_cast<const std::pair<const QuantRows*, const float*>*>(ctx)->first;
  const auto* w = static_cast<const int8_t*>(p.w);
  const int64_t G = p.group, Kp = (p.K + G - 1) / G * G, Q = Kp / kInt8Quad, ng = Kp / G;
  constexpr int kV = kPackBlock / 8;  // 256-bit vectors per block
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float acc[RB][NB * kPackBlock] = {};
  for (int64_t g = 0; g < ng; ++g) {
    __m256i s[RB][NB * kV];
    for (auto& row : s)
      for (auto& v : row) v = _mm256_setzero_si256();
    for (int64_t q = g * G / kInt8Quad; q < (g + 1) * G / kInt8Quad; ++q) {
      __m256i xb[RB];
      for (int r = 0; r < RB; ++r) {
        int32_t quad;
        std::memcpy(&quad, xq.q + (r0 + r) * Kp + q * kInt8Quad, sizeof(quad));
        xb[r] = _mm256_set1_epi32(quad);
      }
      for (int n = 0; n < NB; ++n)
        for (int v = 0; v < kV; ++v) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              w + ((n0 + n) * Q + q) * kInt8Quad * kPackBlock + v * 32));
          const __m256i aw = _mm256_abs_epi8(wv);
          for (int r = 0; r < RB; ++r) {
            const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb[r], wv));
            s[r][n * kV + v] = _mm256_add_epi32(s[r][n * kV + v], _mm256_madd_epi16(pairs, ones));
          }
        }
    }
    for (int n = 0; n < NB; ++n)
      for (int v = 0; v < kV; ++v) {
        const __m256 sw = _mm256_loadu_ps(p.scales + ((n0 + n) * ng + g) * kPackBlock + v * 8);
        for (int r = 0; r < RB; ++r) {
          float* a = acc[r] + n * kPackBlock + v * 8;
          const __m256 d = _mm256_mul_ps(sw, _mm256_set1_ps(xq.scale[(r0 + r) * ng + g]));
          _mm256_store_ps(a, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s[r][n * kV + v]), _mm256_load_ps(a)));
        }
      }
  }
  for (int r = 0; r < RB; ++r) {
    float* y = p.y + (r0 + r) * p.ldy;
    for (int n = 0; n < NB; ++n) {
      const int64_t j0 = (n0 + n) * kPackBlock;
      const int64_t cnt = std::min<int64_t>(kPackBlock, p.M - j0);
      for (int64_t j = 0; j < cnt; ++j)
        y[j0 + j] = p.accumulate ? y[j0 + j] + acc[r][n * kPackBlock + j] : acc[r][n * kPackBlock + j];
    }
  }
}
constexpr bool kInt8Avx2 = true;
#else
constexpr bool kInt8Avx2 = false;
#endif

// The packed formats, each a tile of RB rows x NB blocks. The registers such a tile needs: its accumulators (kAccSets per output vector),
// kXRegs broadcasts of x per row and kWRegs weight vectors per block vector. A broadcast the
// compiler cannot keep is loaded again (cheap); an accumulator it cannot keep costs a store and
// a load per FMA, so the budget is what counts.
struct F32 {
  static constexpr int kAccSets = 1, kXRegs = 1, kWRegs = 1;
  template <int RB, int NB>
  static void tile(const MatvecParams& p, const void* ctx, int64_t r0, int64_t n0) {
    tile_f32<RB, NB>(p, ctx, r0, n0);
  }
};
struct BF16 {
  static constexpr int kAccSets = 1, kXRegs = 1, kWRegs = 3;  // pairs, even, odd
  template <int RB, int NB>
  static void tile(const MatvecParams& p, const void* ctx, int64_t r0, int64_t n0) {
    tile_bf16<RB, NB>(p, ctx, r0, n0);
  }
};
struct Int8 {
  // Portable: group sums + totals; quad, widened. AVX2: int32 group sums (the totals are in
  // memory); weights, |weights|, and the signed x and products as temporaries.
  static constexpr int kAccSets = kInt8Avx2 ? 1 : 2, kXRegs = 1, kWRegs = 2;
  template <int RB, int NB>
  static void tile(const MatvecParams& p, const void* ctx, int64_t r0, int64_t n0) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    tile_int8_avx2<RB, NB>(p, ctx, r0, n0);
#else
    tile_int8<RB, NB>(p, ctx, r0, n0);
#endif
  }
};

template <typename Fmt>
constexpr int tile_regs(int RB, int NB) {
  return RB * NB * kVPB * Fmt::kAccSets + RB * Fmt::kXRegs + kVPB * Fmt::kWRegs;
}

// Blocks [b0, b1) for the rows [r0, r0 + RB): as many blocks per tile as the registers hold, up
// to 4 (independent accumulators hide FMA latency when there are few rows), then one at a time.
template <typename Fmt, int RB>
void rows_tile(const MatvecParams& p, const void* ctx, int64_t r0, int64_t b0, int64_t b1) {
  constexpr int NB = tile_regs<Fmt>(RB, 4) <= kRegs ? 4 : tile_regs<Fmt>(RB, 2) <= kRegs ? 2 : 1;
  int64_t n = b0;
  for (; n + NB <= b1; n += NB) Fmt::template tile<RB, NB>(p, ctx, r0, n);
  for (; n < b1; ++n) Fmt::template tile<RB, 1>(p, ctx, r0, n);
}

// Threads split the output blocks (each reads its own share of the weights once). A thread takes
// its blocks 4 at a time and runs every row tile over them (tiles of 8, 4, 2 and 1 rows, the
// larger ones where the registers hold them: spilled accumulators would turn every FMA into a
// load and a store) before the next 4, so a second tile of rows finds the weights in L1/L2
// instead of reading them from memory again.
template <typename Fmt>
void matvec_impl(const MatvecParams& p, const void* ctx) {
  const int64_t nblk = (p.M + kPackBlock - 1) / kPackBlock;
  at::parallel_for(0, nblk, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0; c0 < b1; c0 += 4) {
      const int64_t c1 = std::min(c0 + 4, b1);
      int64_t r = 0;
      if constexpr (tile_regs<Fmt>(8, 1) <= kRegs)
        for (; r + 8 <= p.N; r += 8) rows_tile<Fmt, 8>(p, ctx, r, c0, c1);
      if constexpr (tile_regs<Fmt>(4, 1) <= kRegs)
        for (; r + 4 <= p.N; r += 4) rows_tile<Fmt, 4>(p, ctx, r, c0, c1);
      for (; r + 2 <= p.N; r += 2) rows_tile<Fmt, 2>(p, ctx, r, c0, c1);
      for (; r < p.N; ++r) rows_tile<Fmt, 1>(p, ctx, r, c0, c1);
    }
  });
}

void matvec_f32_kernel(const MatvecParams& p) { matvec_impl<F32>(p, nullptr); }
void matvec_bf16_kernel(const MatvecParams& p) { matvec_impl<BF16>(p, nullptr); }

// Quantizes x's rows group by group (gptmod/quant.h), then runs the VNNI kernel where the CPU has
// it, else this build's tile (tile_int8_avx2, or tile_int8 in the DEFAULT build).
void matvec_int8_kernel(const MatvecParams& p) {
  const int64_t G = p.group, Kp = (p.K + G - 1) / G * G, ng = Kp / G;
  std::vector<int8_t> q(p.N * Kp);
  std::vector<float> scale(p.N * ng);
  std::vector<int32_t> sum(p.N * ng);
  for (int64_t r = 0; r < p.N; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      int8_t* qg = q.data() + r * Kp + g * G;
      scale[r * ng + g] = quantize_group(p.x + r * p.ldx + g * G, std::min(G, p.K - g * G), G, qg);
      int32_t s = 0;
      for (int64_t i = 0; i < G; ++i) s += qg[i];
      sum[r * ng + g] = s;
    }
  const QuantRows xq{q.data(), scale.data(), sum.data()};
  if (vnni_enabled()) return matvec_int8_vnni_kernel_ptr(p, xq);
  const std::vector<float> xf = kInt8Avx2 ? std::vector<float>() : std::vector<float>(q.begin(), q.end());
  const std::pair<const QuantRows*, const float*> ctx{&xq, xf.data()};
  matvec_impl<Int8>(p, &ctx);
}

}  // namespace

GPTMOD_REGISTER_KERNEL(matvec_f32_stub, matvec_f32_kernel);
GPTMOD_REGISTER_KERNEL(matvec_bf16_stub, matvec_bf16_kernel);
GPTMOD_REGISTER_KERNEL(matvec_int8_stub, matvec_int8_kernel);

}  // namespace gptmod
