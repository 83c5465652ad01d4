// decode_attention CPU kernel, compiled once per CPU capability (DEFAULT, AVX2, AVX512).
//
// Work item = (batch b, KV head kvh, split s): the G = Hq / Hkv query heads of the group times the
// Tq queries (NQ = G * Tq rows of q) attend rows [first, last) of that KV head. K and V are read
// in blocks of BN rows; a block is pulled into L1 by the first query row and reused by the other
// NQ - 1 rows, so each K/V byte comes from memory once per group (the GQA sharing of FlashInfer's
// decode kernel, include/flashinfer/attention/decode.cuh, on a CPU). Per query row we keep an
// online softmax (running max m, running sum l, unnormalised accumulator acc), in fp32 (fp64 for
// fp64 inputs), rescaling acc by exp(m_old - m_new) when the max grows.
//
// Bottom-right causality makes each query's visible rows a prefix 0 .. len - Tq + t of the cache,
// so masking is a per-query row count, never a -inf score; rows >= len are never loaded, so
// whatever they hold (NaN included) cannot reach the result.
//
// When B * Hkv items cannot keep every thread busy the sequences are split (decode_attention_
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

#include "gptmod/decode_attention.h"

namespace gptmod {
namespace {

using at::vec::Vectorized;

// Math type: fp32 for fp32/fp16/bf16 (design.md: math in fp32), fp64 for fp64 inputs.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// dst[0, n) = float(src[0, n)) (or a plain copy when the types agree).
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t n) {
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

// Dot products of one query row q (in registers for a compile-time head dim) with n key rows.
// kD = 0 is the generic path for head dims that are not a multiple of the vector width.
template <int kD, typename acc_t>
inline void row_scores(const acc_t* __restrict__ q,  // [D]
                       const acc_t* __restrict__ k,  // [n, D], row stride k_stride
                       int64_t k_stride, int64_t n, int64_t D, acc_t* __restrict__ s) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VL = Vec::size();
  if constexpr (kD > 0 && kD % VL == 0) {
    constexpr int NV = kD / VL;
    Vec qv[NV];
    for (int i = 0; i < NV; ++i) qv[i] = Vec::loadu(q + i * VL);
    for (int64_t j = 0; j < n; ++j) {
      const acc_t* kr = k + j * k_stride;
      // Two accumulators halve the FMA dependency chain.
      Vec a0(0), a1(0);
      for (int i = 0; i + 1 < NV; i += 2) {
        a0 = at::vec::fmadd(qv[i], Vec::loadu(kr + i * VL), a0);
        a1 = at::vec::fmadd(qv[i + 1], Vec::loadu(kr + (i + 1) * VL), a1);
      }
      if constexpr (NV % 2) a0 = at::vec::fmadd(qv[NV - 1], Vec::loadu(kr + (NV - 1) * VL), a0);
      s[j] = hsum(a0 + a1);
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
inline void row_accumulate(acc_t* __restrict__ acc, acc_t alpha, const acc_t* __restrict__ p,
                           const acc_t* __restrict__ v, int64_t v_stride, int64_t n, int64_t D) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VL = Vec::size();
  if constexpr (kD > 0 && kD % VL == 0) {
    constexpr int NV = kD / VL;
    Vec av[NV];
    const Vec al(alpha);
    for (int i = 0; i < NV; ++i) av[i] = Vec::loadu(acc + i * VL) * al;
    for (int64_t j = 0; j < n; ++j) {
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

// Per-thread buffers, sized once per parallel chunk.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, acc, m, l, scores, kbuf, vbuf;
};

// One work item: queries of group (b, kvh) against rows [first, last) of the cache.
// Writes the normalised output into out (num_splits == 1) or (o_s, lse_s) into the workspace.
template <typename scalar_t, int kD>
void attend_item(const DecodeAttentionParams& p, int64_t b, int64_t kvh, int64_t split,
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

  // Query rows i = t * G + g (head kvh * G + g), pre-multiplied by scale.
  const scalar_t* q = static_cast<const scalar_t*>(p.q);
  for (int64_t i = 0; i < NQ; ++i) {
    const int64_t t = i / G, h = kvh * G + i % G;
    acc_t* qi = w.q.data() + i * D;
    load_row(q + b * p.q_stride_b + t * p.q_stride_t + h * p.q_stride_h, qi, D);
    for (int64_t d = 0; d < D; ++d) qi[d] *= static_cast<acc_t>(p.scale);
  }
  std::fill(w.acc.begin(), w.acc.begin() + NQ * D, acc_t(0));
  std::fill(w.m.begin(), w.m.begin() + NQ, -std::numeric_limits<acc_t>::infinity());
  std::fill(w.l.begin(), w.l.begin() + NQ, acc_t(0));

  const scalar_t* kc = static_cast<const scalar_t*>(p.k_cache) + b * p.k_stride_b + kvh * p.k_stride_h;
  const scalar_t* vc = static_cast<const scalar_t*>(p.v_cache) + b * p.v_stride_b + kvh * p.v_stride_h;
  const acc_t softcap = p.softcap;

  for (int64_t j0 = first; j0 < last; j0 += BN) {
    const int64_t n = std::min(BN, last - j0);
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
      // Rows this query may see within the block (a prefix: causal masking).
      const int64_t nv = std::min(n, attention_visible_rows(len, Tq, i / G) - j0);
      if (nv <= 0) continue;
      acc_t* s = w.scores.data();
      row_scores<kD>(w.q.data() + i * D, kb, ks, nv, D, s);
      if (softcap > 0) {
        for (int64_t j = 0; j < nv; ++j) s[j] = attention_softcap(s[j], softcap);
      }
      acc_t mb = s[0];
      for (int64_t j = 1; j < nv; ++j) mb = std::max(mb, s[j]);
      const acc_t m_old = w.m[i];
      const acc_t m_new = std::max(m_old, mb);
      // m_old = -inf (first block) gives alpha = 0; m_new is finite since nv > 0.
      const acc_t alpha = std::exp(m_old - m_new);
      at::vec::map([m_new](Vectorized<acc_t> x) { return (x - Vectorized<acc_t>(m_new)).exp(); },
                   s, s, nv);
      acc_t sum = 0;
      for (int64_t j = 0; j < nv; ++j) sum += s[j];
      w.l[i] = w.l[i] * alpha + sum;
      w.m[i] = m_new;
      row_accumulate<kD>(w.acc.data() + i * D, alpha, s, vb, vs, nv, D);
    }
  }

  if (num_splits == 1) {
    scalar_t* out = static_cast<scalar_t*>(p.out);
    for (int64_t i = 0; i < NQ; ++i) {
      const int64_t t = i / G, h = kvh * G + i % G;
      scalar_t* o = out + ((b * Tq + t) * p.Hq + h) * D;
      const acc_t inv = w.l[i] > 0 ? acc_t(1) / w.l[i] : acc_t(0);
      const acc_t* a = w.acc.data() + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
    }
  } else {
    const int64_t base = (b * p.Hkv + kvh) * num_splits + split;
    for (int64_t i = 0; i < NQ; ++i) {
      const acc_t l = w.l[i];
      const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
      acc_t* o = ws_out + (base * NQ + i) * D;
      const acc_t* a = w.acc.data() + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      ws_lse[base * NQ + i] = l > 0 ? w.m[i] + std::log(l) : -std::numeric_limits<acc_t>::infinity();
    }
  }
}

template <typename scalar_t, int kD>
void decode_attention_impl(const DecodeAttentionParams& p) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t B = p.B, Hkv = p.Hkv, D = kD > 0 ? kD : p.D;
  const int64_t G = p.Hq / Hkv, NQ = G * p.Tq;
  int64_t max_len = 1;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, p.cache_seqlens[b]);

  int64_t num_splits = p.num_splits > 0
      ? p.num_splits
      : decode_attention_cpu_num_splits(B, Hkv, max_len, at::get_num_threads());
  num_splits = std::max<int64_t>(1, std::min(num_splits, max_len));
  const int64_t chunk = attention_split_chunk(max_len, num_splits);
  // Block rows: K and V blocks of BN x D math-type values stay within ~16 KB each (L1).
  const int64_t BN = std::clamp<int64_t>(16384 / (D * int64_t(sizeof(acc_t))), 8, 128);

  std::vector<acc_t> ws_out, ws_lse;
  if (num_splits > 1) {
    ws_out.resize(B * Hkv * num_splits * NQ * D);
    ws_lse.resize(B * Hkv * num_splits * NQ);
  }

  const int64_t items = B * Hkv * num_splits;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> w;
    w.q.resize(NQ * D);
    w.acc.resize(NQ * D);
    w.m.resize(NQ);
    w.l.resize(NQ);
    w.scores.resize(BN);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      w.kbuf.resize(BN * D);
      w.vbuf.resize(BN * D);
    }
    for (int64_t it = begin; it < end; ++it) {
      const int64_t split = it % num_splits;
      const int64_t kvh = (it / num_splits) % Hkv;
      const int64_t b = it / (num_splits * Hkv);
      attend_item<scalar_t, kD>(p, b, kvh, split, num_splits, chunk, BN, w, ws_out.data(),
                                ws_lse.data());
    }
  });
  if (num_splits == 1) return;

  // Merge: one row (b, kvh, i) at a time; every query sees row 0, so some split has a finite lse.
  scalar_t* out = static_cast<scalar_t*>(p.out);
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
      scalar_t* dst = out + ((b * p.Tq + t) * p.Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
    }
  });
}

// Head dims 64 and 128 (the common ones) get a compile-time D so q and acc stay in registers.
template <typename scalar_t>
void dispatch_head_dim(const DecodeAttentionParams& p) {
  switch (p.D) {
    case 64: return decode_attention_impl<scalar_t, 64>(p);
    case 128: return decode_attention_impl<scalar_t, 128>(p);
    default: return decode_attention_impl<scalar_t, 0>(p);
  }
}

void decode_attention_kernel(const DecodeAttentionParams& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: return dispatch_head_dim<float>(p);
    case c10::ScalarType::Double: return dispatch_head_dim<double>(p);
    case c10::ScalarType::Half: return dispatch_head_dim<c10::Half>(p);
    case c10::ScalarType::BFloat16: return dispatch_head_dim<c10::BFloat16>(p);
    default: return;  // the entry point has checked the dtype
  }
}

}  // namespace
GPTMOD_REGISTER_KERNEL(decode_attention_stub, decode_attention_kernel);
}  // namespace gptmod
