// The fused decode step (gptmod::decode_step; README.md, "The fused CPU decode step"), compiled once per CPU
// capability: every layer of a pre-norm RMSNorm / RoPE / GQA / SwiGLU decoder for one new token
// per row, in one call. Eager PyTorch spends ~570 dispatches per token on this model shape;
// here the work between the weight reads (norms, RoPE, the KV write, attention over the cache,
// SwiGLU, the residual adds) is a few loops over vectors of C or D floats. Activations are fp32
// throughout; weights, norms, the cache and the logits are in the model's dtype.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gptmod/decode_step.h"
#include "gptmod/vec_utils.h"

namespace gptmod {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVS = Vec::size();

template <typename T>
inline float f32(T v) { return float(v); }

// sum_d a[d] * b[d] in fp32 vectors (a scalar loop would be one latency-bound FMA chain: the
// compiler may not reorder a float reduction).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f);
  int64_t d = 0;
  for (; d + 2 * kVS <= n; d += 2 * kVS) {
    acc0 = at::vec::fmadd(Vec::loadu(a + d), gptmod::vec::load1(b + d), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + d + kVS), gptmod::vec::load1(b + d + kVS), acc1);
  }
  for (; d + kVS <= n; d += kVS) acc0 = at::vec::fmadd(Vec::loadu(a + d), gptmod::vec::load1(b + d), acc0);
  alignas(64) float buf[kVS];
  (acc0 + acc1).store(buf);
  float s = 0.f;
  for (int64_t i = 0; i < kVS; ++i) s += buf[i];
  for (; d < n; ++d) s += a[d] * f32(b[d]);
  return s;
}

// o[d] += w * v[d]
template <typename T>
inline void axpy(float* o, float w, const T* v, int64_t n) {
  int64_t d = 0;
  for (; d + kVS <= n; d += kVS)
    at::vec::fmadd(Vec(w), gptmod::vec::load1(v + d), Vec::loadu(o + d)).store(o + d);
  for (; d < n; ++d) o[d] += w * f32(v[d]);
}

// out[r] = x[r] / rms(x[r]) * w, x fp32 [B, C].
template <typename T>
void rmsnorm(const float* x, const T* w, float* out, int64_t B, int64_t C, float eps) {
  for (int64_t r = 0; r < B; ++r) {
    const float* xr = x + r * C;
    const float ss = dot(xr, xr, C);
    const float inv = 1.f / std::sqrt(ss / float(C) + eps);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = xr[c] * inv * f32(w[c]);
  }
}

// Rotates heads [H, D] of one token at table row `pos` (cos/sin [max_pos, D/2]).
void rope_heads(float* x, int64_t H, int64_t D, const float* cos, const float* sin, bool interleaved) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    float* v = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
      const float x0 = v[a], x1 = v[b];
      v[a] = x0 * cos[i] - x1 * sin[i];
      v[b] = x1 * cos[i] + x0 * sin[i];
    }
  }
}

template <typename T>
struct Step {
  const DecodeStepParams& p;
  int64_t QKV;  // (Hq + 2 Hkv) * D

  T* kv_row(int64_t l, int64_t s, int64_t b, int64_t t) const {
    return static_cast<T*>(p.kv) + l * p.kv_stride[0] + s * p.kv_stride[1] + b * p.kv_stride[2] +
           t * p.Hkv * p.D;
  }

  void matvec(const float* x, int64_t K, int64_t w, float* y, int64_t M, bool accumulate) const {
    p.matvec(MatvecParams{x, p.linears[w], y, p.B, K, M, K, M, accumulate});
  }

  // qkv [B, QKV] -> RoPE'd q in place, k/v appended to the cache at row seqlens[b].
  void rope_and_append(float* qkv, int64_t l) const {
    const int64_t half = p.D / 2, QD = p.Hq * p.D, KD = p.Hkv * p.D;
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t pos = p.seqlens[b];
      float* q = qkv + b * QKV;
      rope_heads(q, p.Hq + p.Hkv, p.D, p.cos + pos * half, p.sin + pos * half, p.interleaved);
      T* kc = kv_row(l, 0, b, pos);
      T* vc = kv_row(l, 1, b, pos);
      for (int64_t i = 0; i < KD; ++i) {
        kc[i] = T(q[QD + i]);
        vc[i] = T(q[QD + KD + i]);
      }
    }
  }

  // out [B, Hq*D]: query head h of row b attends to cache rows <= seqlens[b] of KV head
  // h / (Hq / Hkv), softmax in fp32.
  void attention(const float* qkv, int64_t l, float* out) const {
    const int64_t group = p.Hq / p.Hkv, D = p.D;
    at::parallel_for(0, p.B * p.Hq, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> sc;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / p.Hq, h = i % p.Hq, kvh = h / group, n = p.seqlens[b] + 1;
        const float* q = qkv + b * QKV + h * D;
        sc.resize(n);
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          sc[t] = dot(q, kv_row(l, 0, b, t) + kvh * D, D) * p.scale;
          mx = std::max(mx, sc[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
        float* o = out + b * p.Hq * D + h * D;
        std::fill(o, o + D, 0.f);
        for (int64_t t = 0; t < n; ++t) {
          axpy(o, sc[t] / sum, kv_row(l, 1, b, t) + kvh * D, D);
        }
      }
    });
  }

  void run() const {
    const int64_t B = p.B, C = p.C, F = p.F;
    std::vector<float> x(B * C), h(B * C), qkv(B * QKV), att(B * p.Hq * p.D), gu(B * 2 * F),
        a(B * F), logits(B * p.Vp);
    const T* x0 = static_cast<const T*>(p.x);
    for (int64_t i = 0; i < B * C; ++i) x[i] = f32(x0[i]);
    auto norm = [&](int64_t i) { return static_cast<const T*>(p.norms[i]); };
    for (int64_t l = 0; l < p.L; ++l) {
      rmsnorm(x.data(), norm(2 * l), h.data(), B, C, p.eps);
      matvec(h.data(), C, 4 * l, qkv.data(), QKV, false);
      rope_and_append(qkv.data(), l);
      attention(qkv.data(), l, att.data());
      matvec(att.data(), p.Hq * p.D, 4 * l + 1, x.data(), C, true);
      rmsnorm(x.data(), norm(2 * l + 1), h.data(), B, C, p.eps);
      matvec(h.data(), C, 4 * l + 2, gu.data(), 2 * F, false);
      for (int64_t r = 0; r < B; ++r)
        for (int64_t j = 0; j < F; ++j) {
          const float g = gu[r * 2 * F + j], u = gu[r * 2 * F + F + j];
          a[r * F + j] = g / (1.f + std::exp(-g)) * u;
        }
      matvec(a.data(), F, 4 * l + 3, x.data(), C, true);
    }
    rmsnorm(x.data(), norm(2 * p.L), h.data(), B, C, p.eps);
    matvec(h.data(), C, 4 * p.L, logits.data(), p.Vp, false);
    T* out = static_cast<T*>(p.logits);
    for (int64_t i = 0; i < B * p.Vp; ++i) {
      float v = logits[i];
      if (p.softcap > 0) v = p.softcap * std::tanh(v / p.softcap);
      out[i] = T(v);
    }
  }
};

void decode_step_kernel(const DecodeStepParams& p) {
  const int64_t QKV = (p.Hq + 2 * p.Hkv) * p.D;
  if (p.dtype == c10::ScalarType::BFloat16)
    Step<c10::BFloat16>{p, QKV}.run();
  else
    Step<float>{p, QKV}.run();
}

}  // namespace

GPTMOD_REGISTER_KERNEL(decode_step_stub, decode_step_kernel);

}  // namespace gptmod
