// decode_attention CPU kernel, compiled once per CPU capability (DEFAULT, AVX2, AVX512).
//
// Work item = (batch b, KV heads [h0, h0 + HG), split s): all KV heads of the sequence when their
// state is small (HG = Hkv), else one. For each KV head the G = Hq / Hkv query heads of the group
// times the Tq queries (NQ = G * Tq query rows) attend rows [first, last) of that head. K and V
// are read in blocks of BN rows; a block is pulled into L1 by the first query row and reused by
// the other NQ - 1, so each K/V byte comes from memory once per group (the GQA sharing of
// FlashInfer's decode kernel, include/flashinfer/attention/decode.cuh, on a CPU). The heads of an
// item are interleaved block by block, so the walk over the cache rows (all heads side by side)
// is front to back. Per query row an online softmax (running max m, running sum l, unnormalised
// accumulator acc) in fp32 (fp64 for fp64 inputs) rescales acc by exp(m_old - m_new) when the
// max grows.
//
// Inner loops (at::vec::Vectorized, fp16/bf16 rows converted to fp32 per block): dot products
// four rows at a time with one combined horizontal reduction; P.V with two rows per step into
// two accumulator sets (shorter FMA chains); max, exp and softcap vectorized over the block.
//
// Bottom-right causality makes each query's visible rows a prefix 0 .. len - Tq + t of the cache,
// so masking is a per-query row count, never a -inf score; rows >= len are never loaded, so
// whatever they hold (NaN included) cannot reach the result.
//
// When the items cannot keep every thread busy the sequences are split (decode_attention_
// common.h); each split stores (normalised output, lse) into a workspace and a second parallel
// pass merges them with log-sum-exp weights.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "gptmod/acc_type.h"
#include "gptmod/cpu_rows.h"
#include "gptmod/decode_attention.h"
#include "gptmod/dispatch.h"

namespace gptmod {
namespace {

using at::vec::Vectorized;

// dst[0, n) = float(src[0, n)) (or a plain copy when the types agree).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict__ src,  // [n]
                     acc_t* __restrict__ dst,           // [n]
                     int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using SVec = Vectorized<scalar_t>;
    using FVec = Vectorized<float>;
    int64_t d = 0;
    for (; d + SVec::size() <= n; d += SVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(SVec::loadu(src + d));
      lo.store(dst + d);
      hi.store(dst + d + FVec::size());
    }
    // Scalar tail, written as a count (GCC otherwise warns about the unreachable tail of the
    // D = 64 / 128 instances).
    const int64_t rest = n - d;
    for (int64_t u = 0; u < rest; ++u) dst[d + u] = static_cast<float>(src[d + u]);
  }
}

// Horizontal sum. reduce_add exists only for the AVX2/AVX512 Vectorized<float>.
template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.reduce_add();
  } else
#endif
  {
    return at::vec::vec_reduce_all<acc_t>(
        [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// out[0..3] = horizontal sums of four 8-float vectors: two rounds of hadd give, per 128-bit
// half, the four partial sums side by side; adding the halves finishes them.
inline void hsum4_256(__m256 b0, __m256 b1, __m256 b2, __m256 b3, float* out /* [4] */) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
#endif

// out[r] = sum of the lanes of a[r], r < 4: ~13 instructions for four rows where four separate
// reductions take ~40 (the reductions dominated the score loop).
template <typename acc_t>
inline void hsum4(const Vectorized<acc_t> (&a)[4], acc_t* out /* [4] */) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    __m256 b[4];
    for (int r = 0; r < 4; ++r) {
      const __m512 v = a[r];
      b[r] = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    }
    hsum4_256(b[0], b[1], b[2], b[3], out);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    hsum4_256(a[0], a[1], a[2], a[3], out);
    return;
  }
#endif
  for (int r = 0; r < 4; ++r) out[r] = hsum(a[r]);
}

// Dot products of one query row q (in registers for a compile-time head dim) with n key rows.
// kD = 0 is the generic path for head dims that are not a multiple of the vector width.
template <int kD, typename acc_t>
inline void row_scores(const acc_t* __restrict__ q,  // [D]
                       const acc_t* __restrict__ k,  // [n, D], row stride k_stride
                       int64_t k_stride, int64_t n, int64_t D,
                       acc_t* __restrict__ s) {      // [n]
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VL = Vec::size();
  if constexpr (kD > 0 && kD % VL == 0) {
    constexpr int NV = kD / VL;
    Vec qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = Vec::loadu(q + i * VL);
    int64_t j = 0;
    // Four rows at a time: four independent FMA chains, one combined reduction.
    for (; j + 4 <= n; j += 4) {
      Vec a[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
      for (int i = 0; i < NV; ++i)
        for (int r = 0; r < 4; ++r)
          a[r] = at::vec::fmadd(qv[i], Vec::loadu(k + (j + r) * k_stride + i * VL), a[r]);
      hsum4(a, s + j);
    }
    for (; j < n; ++j) {
      const acc_t* kr = k + j * k_stride;
      Vec a0(0);
      for (int i = 0; i < NV; ++i) a0 = at::vec::fmadd(qv[i], Vec::loadu(kr + i * VL), a0);
      s[j] = hsum(a0);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t* kr = k + j * k_stride;
      Vec a0(0);
      int64_t d = 0;
      for (; d + VL <= D; d += VL) a0 = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(kr + d), a0);
      acc_t r = hsum(a0);
      for (; d < D; ++d) r += q[d] * kr[d];
      s[j] = r;
    }
  }
}

// acc = alpha * acc + sum_j p[j] * v[j]   (acc: [D], v: [n, D] with row stride v_stride)
template <int kD, typename acc_t>
inline void row_accumulate(acc_t* __restrict__ acc,      // [D]
                           acc_t alpha,
                           const acc_t* __restrict__ p,  // [n]
                           const acc_t* __restrict__ v,  // [n, D], row stride v_stride
                           int64_t v_stride, int64_t n, int64_t D) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VL = Vec::size();
  if constexpr (kD > 0 && kD % VL == 0) {
    constexpr int NV = kD / VL;
    Vec av[NV];
    const Vec al(alpha);
    for (int i = 0; i < NV; ++i) av[i] = Vec::loadu(acc + i * VL) * al;
    int64_t j = 0;
    if constexpr (NV <= 8) {
      // Two rows per step into two accumulator sets: each FMA chain gets half as long.
      Vec bv[NV];
      for (int i = 0; i < NV; ++i) bv[i] = Vec(0);
      for (; j + 2 <= n; j += 2) {
        const Vec p0(p[j]), p1(p[j + 1]);
        const acc_t* v0 = v + j * v_stride;
        const acc_t* v1 = v0 + v_stride;
        for (int i = 0; i < NV; ++i) {
          av[i] = at::vec::fmadd(p0, Vec::loadu(v0 + i * VL), av[i]);
          bv[i] = at::vec::fmadd(p1, Vec::loadu(v1 + i * VL), bv[i]);
        }
      }
      for (int i = 0; i < NV; ++i) av[i] = av[i] + bv[i];
    }
    for (; j < n; ++j) {
      const Vec pj(p[j]);
      const acc_t* vr = v + j * v_stride;
      for (int i = 0; i < NV; ++i) av[i] = at::vec::fmadd(pj, Vec::loadu(vr + i * VL), av[i]);
    }
    for (int i = 0; i < NV; ++i) av[i].store(acc + i * VL);
  } else {
    if (alpha != acc_t(1))
      for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      const Vec pj(p[j]);
      const acc_t* vr = v + j * v_stride;
      int64_t d = 0;
      for (; d + VL <= D; d += VL)
        at::vec::fmadd(pj, Vec::loadu(vr + d), Vec::loadu(acc + d)).store(acc + d);
      for (; d < D; ++d) acc[d] += p[j] * vr[d];
    }
  }
}

// max(s[0, n)), n >= 1. Vectorized: a scalar std::max loop kept its running value in memory.
template <typename acc_t>
inline acc_t block_max(const acc_t* s /* [n] */, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t j = 0;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  if (n >= Vec::size()) {
    Vec mv = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) mv = at::vec::maximum(mv, Vec::loadu(s + j));
    alignas(64) acc_t tmp[Vec::size()];
    mv.store(tmp);
    for (int64_t u = 0; u < Vec::size(); ++u) m = tmp[u] > m ? tmp[u] : m;
  }
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[j] = exp(s[j] - m) for j < n; returns the sum.
template <typename acc_t>
inline acc_t exp_and_sum(acc_t* s /* [n] */, int64_t n, acc_t m) {
  using Vec = Vectorized<acc_t>;
  const Vec mv(m);
  Vec sv(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(s + j) - mv).exp();
    e.store(s + j);
    sv = sv + e;
  }
  acc_t sum = 0;
  if (j < n) {
    const int64_t rest = n - j;
    const Vec e = (Vec::loadu(s + j, rest) - mv).exp();
    e.store(s + j, rest);
    alignas(64) acc_t tmp[Vec::size()];
    e.store(tmp);
    for (int64_t u = 0; u < rest; ++u) sum += tmp[u];
  }
  alignas(64) acc_t tmp[Vec::size()];
  sv.store(tmp);
  for (int64_t u = 0; u < Vec::size(); ++u) sum += tmp[u];
  return sum;
}

// Per-thread buffers, sized once per parallel chunk.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, acc, m, l, scores, kbuf, vbuf;
};

// One work item: the query groups of KV heads [h0, h0 + HG) of sequence b against rows
// [first, last) of split `split`. The heads are interleaved block by block (block j0 of head h0,
// of head h0 + 1, ..., then the next block), so the item walks the cache rows, which hold all
// heads side by side, front to back instead of once per head with a Hkv * D stride: the
// hardware prefetchers see one stream. Writes the normalised output into out (num_splits == 1)
// or (o_s, lse_s) into the workspace. q and out are io_t: scalar_t, or float for the fused decode
// step's fp32 activations over a reduced-precision cache.
template <typename scalar_t, typename io_t, int kD>
void attend_item(const DecodeAttentionParams& p, int64_t b, int64_t h0, int64_t HG, int64_t split,
                 int64_t num_splits, int64_t chunk, int64_t BN,
                 Scratch<typename AccType<scalar_t>::type>& w,
                 typename AccType<scalar_t>::type* __restrict__ ws_out,  // [B, Hkv, splits, NQ, D]
                 typename AccType<scalar_t>::type* __restrict__ ws_lse) {  // [B, Hkv, splits, NQ]
  using acc_t = typename AccType<scalar_t>::type;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t D = kD > 0 ? kD : p.D;
  const int64_t Tq = p.Tq, G = p.Hq / p.Hkv, NQ = G * Tq;
  const int64_t len = p.cache_seqlens[b];
  int64_t first, last;
  if (num_splits > 1) {
    attention_split_range(len, chunk, split, &first, &last);
  } else {
    first = 0;
    last = len;
  }

  // State row x = hh * NQ + i: head kvh = h0 + hh, query row i = t * G + g (q head kvh * G + g).
  // q is pre-multiplied by scale.
  const io_t* q = static_cast<const io_t*>(p.q);
  for (int64_t x = 0; x < HG * NQ; ++x) {
    const int64_t kvh = h0 + x / NQ, i = x % NQ;
    const int64_t t = i / G, h = kvh * G + i % G;
    acc_t* qi = w.q.data() + x * D;
    load_row(q + b * p.q_stride_b + t * p.q_stride_t + h * p.q_stride_h, qi, D);
    for (int64_t d = 0; d < D; ++d) qi[d] *= static_cast<acc_t>(p.scale);
  }
  std::fill(w.acc.begin(), w.acc.begin() + HG * NQ * D, acc_t(0));
  std::fill(w.m.begin(), w.m.begin() + HG * NQ, -std::numeric_limits<acc_t>::infinity());
  std::fill(w.l.begin(), w.l.begin() + HG * NQ, acc_t(0));

  const scalar_t* kseq = static_cast<const scalar_t*>(p.k_cache) + b * p.k_stride_b;
  const scalar_t* vseq = static_cast<const scalar_t*>(p.v_cache) + b * p.v_stride_b;
  const acc_t softcap = p.softcap;
  // With several KV heads a head's rows are Hkv * D apart and the walk hops between heads;
  // software prefetch of the next block measured ~10% faster there (B=8, Hkv=4, 4K rows), while a
  // single head's contiguous stream is better left to the hardware prefetcher.
  const bool prefetch = p.Hkv > 1;

  for (int64_t j0 = first; j0 < last; j0 += BN) {
    const int64_t n = std::min(BN, last - j0);
    if (prefetch) {
      // Ask for the next block of every head of the item while this one is computed.
      const int64_t pf_end = std::min(last, j0 + 2 * BN);
      const int64_t row_bytes = D * int64_t(sizeof(scalar_t));
      for (int64_t j = j0 + BN; j < pf_end; ++j)
        for (int64_t hh = 0; hh < HG; ++hh) {
          const char* kr = reinterpret_cast<const char*>(kseq + j * p.k_stride_s + (h0 + hh) * p.k_stride_h);
          const char* vr = reinterpret_cast<const char*>(vseq + j * p.v_stride_s + (h0 + hh) * p.v_stride_h);
          for (int64_t o = 0; o < row_bytes; o += 64) {
            __builtin_prefetch(kr + o, 0, 3);
            __builtin_prefetch(vr + o, 0, 3);
          }
        }
    }
    for (int64_t hh = 0; hh < HG; ++hh) {
      const scalar_t* kc = kseq + (h0 + hh) * p.k_stride_h;
      const scalar_t* vc = vseq + (h0 + hh) * p.v_stride_h;
      const acc_t *kb, *vb;
      int64_t ks, vs;
      if constexpr (kConvert) {
        for (int64_t j = 0; j < n; ++j) {
          load_row(kc + (j0 + j) * p.k_stride_s, w.kbuf.data() + j * D, D);
          load_row(vc + (j0 + j) * p.v_stride_s, w.vbuf.data() + j * D, D);
        }
        kb = w.kbuf.data();
        vb = w.vbuf.data();
        ks = vs = D;
      } else {
        kb = kc + j0 * p.k_stride_s;
        vb = vc + j0 * p.v_stride_s;
        ks = p.k_stride_s;
        vs = p.v_stride_s;
      }
      for (int64_t i = 0; i < NQ; ++i) {
        const int64_t x = hh * NQ + i;
        // Rows this query may see within the block (a prefix: causal masking).
        const int64_t nv = std::min(n, attention_visible_rows(len, Tq, i / G) - j0);
        if (nv <= 0) continue;
        acc_t* s = w.scores.data();
        row_scores<kD>(w.q.data() + x * D, kb, ks, nv, D, s);
        if (softcap > 0) gptmod::vec::softcap_row(s, nv, softcap);
        const acc_t mb = block_max(s, nv);
        const acc_t m_old = w.m[x];
        const acc_t m_new = m_old > mb ? m_old : mb;
        // m_old = -inf (first block) gives alpha = 0; m_new is finite since nv > 0.
        const acc_t alpha = std::exp(m_old - m_new);
        const acc_t sum = exp_and_sum(s, nv, m_new);
        w.l[x] = w.l[x] * alpha + sum;
        w.m[x] = m_new;
        row_accumulate<kD>(w.acc.data() + x * D, alpha, s, vb, vs, nv, D);
      }
    }
  }

  for (int64_t x = 0; x < HG * NQ; ++x) {
    const int64_t kvh = h0 + x / NQ, i = x % NQ;
    const acc_t l = w.l[x];
    const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
    const acc_t* a = w.acc.data() + x * D;
    if (num_splits == 1) {
      const int64_t t = i / G, h = kvh * G + i % G;
      io_t* o = static_cast<io_t*>(p.out) + ((b * Tq + t) * p.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<io_t>(a[d] * inv);
    } else {
      const int64_t row = ((b * p.Hkv + kvh) * num_splits + split) * NQ + i;
      acc_t* o = ws_out + row * D;
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      ws_lse[row] = l > 0 ? w.m[x] + std::log(l) : -std::numeric_limits<acc_t>::infinity();
    }
  }
}

template <typename scalar_t, typename io_t, int kD>
void decode_attention_impl(const DecodeAttentionParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t B = p.B, Hkv = p.Hkv, D = kD > 0 ? kD : p.D;
  const int64_t G = p.Hq / Hkv, NQ = G * p.Tq;
  int64_t max_len = 1;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, p.cache_seqlens[b]);

  // All KV heads of a sequence in one item (one front-to-back walk of the cache rows) while
  // their state (q, acc) stays small; otherwise one head per item.
  const int64_t HG = Hkv * NQ * D * int64_t(sizeof(acc_t)) <= (256 << 10) ? Hkv : 1;
  const int64_t head_items = Hkv / HG;
  int64_t num_splits = p.num_splits > 0
      ? p.num_splits
      : decode_attention_cpu_num_splits(B, head_items, max_len, at::get_num_threads());
  num_splits = std::max<int64_t>(1, std::min(num_splits, max_len));
  const int64_t chunk = attention_split_chunk(max_len, num_splits);
  // Block rows: K and V blocks of BN x D math-type values stay within ~16 KB each (L1).
  const int64_t BN = std::clamp<int64_t>(16384 / (D * int64_t(sizeof(acc_t))), 8, 128);

  std::vector<acc_t> ws_out, ws_lse;
  if (num_splits > 1) {
    ws_out.resize(B * Hkv * num_splits * NQ * D);
    ws_lse.resize(B * Hkv * num_splits * NQ);
  }

  const int64_t items = B * head_items * num_splits;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w;
    w.q.resize(HG * NQ * D);
    w.acc.resize(HG * NQ * D);
    w.m.resize(HG * NQ);
    w.l.resize(HG * NQ);
    w.scores.resize(BN);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      w.kbuf.resize(BN * D);
      w.vbuf.resize(BN * D);
    }
    for (int64_t it = begin; it < end; ++it) {
      const int64_t split = it % num_splits;
      const int64_t hg = (it / num_splits) % head_items;
      const int64_t b = it / (num_splits * head_items);
      attend_item<scalar_t, io_t, kD>(p, b, hg * HG, HG, split, num_splits, chunk, BN, w,
                                ws_out.data(), ws_lse.data());
    }
  });
  if (num_splits == 1) return;

  // Merge: one row (b, kvh, i) at a time; every query sees row 0, so some split has a finite lse.
  io_t* out = static_cast<io_t*>(p.out);
  at::parallel_for(0, B * Hkv * NQ, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % NQ, kvh = (r / NQ) % Hkv, b = r / (NQ * Hkv);
      const int64_t base = (b * Hkv + kvh) * num_splits;
      acc_t M = -std::numeric_limits<acc_t>::infinity();
      for (int64_t s = 0; s < num_splits; ++s) M = std::max(M, ws_lse[(base + s) * NQ + i]);
      std::fill(o.begin(), o.end(), acc_t(0));
      acc_t wsum = 0;
      if (M != -std::numeric_limits<acc_t>::infinity()) {
        for (int64_t s = 0; s < num_splits; ++s) {
          const acc_t lse = ws_lse[(base + s) * NQ + i];
          if (lse == -std::numeric_limits<acc_t>::infinity()) continue;
          const acc_t wt = std::exp(lse - M);
          wsum += wt;
          const acc_t* os = ws_out.data() + ((base + s) * NQ + i) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += wt * os[d];
        }
      }
      const acc_t inv = wsum > 0 ? acc_t(1) / wsum : acc_t(0);
      const int64_t t = i / G, h = kvh * G + i % G;
      io_t* dst = out + ((b * p.Tq + t) * p.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<io_t>(o[d] * inv);
    }
  });
}

// Head dims 64 and 128 (the common ones) get a compile-time D so q and acc stay in registers.
template <typename scalar_t, typename io_t>
void dispatch_head_dim(const DecodeAttentionParams& p) {
  switch (p.D) {
    case 64: return decode_attention_impl<scalar_t, io_t, 64>(p);
    case 128: return decode_attention_impl<scalar_t, io_t, 128>(p);
    default: return decode_attention_impl<scalar_t, io_t, 0>(p);
  }
}

void decode_attention_kernel(const DecodeAttentionParams& p) {
  GPTMOD_DISPATCH_FLOATING_TYPES(p.dtype, "decode_attention", [&] {
    // fp32 q/out over a reduced-precision cache: the fused decode step (float math types only).
    if constexpr (!std::is_same_v<scalar_t, float> && std::is_same_v<acc_t<scalar_t>, float>) {
      if (p.fp32_io) return dispatch_head_dim<scalar_t, float>(p);
    }
    dispatch_head_dim<scalar_t, scalar_t>(p);
  });
}

}  // namespace
GPTMOD_REGISTER_KERNEL(decode_attention_stub, decode_attention_kernel);
}  // namespace gptmod
