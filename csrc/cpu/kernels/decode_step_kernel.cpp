// The fused decode step (gptmod::decode_step; README.md, "The fused CPU decode step"), compiled
// once per CPU capability: every layer of a pre-norm RMSNorm / RoPE / GQA / SwiGLU decoder for one
// new token per row, in one call. Eager PyTorch spends ~570 dispatches per token on this model
// shape; here the work between the weight reads is done in place by the ops' own kernels: rope's
// and swiglu's row kernels (gptmod/cpu_rows.h), kv_cache_write's copy (gptmod/kv_cache.h) and
// decode_attention's kernel, so each formula has one implementation. Activations are fp32
// throughout; norms, the cache and the logits are in the model's dtype, the packed weights in it
// or in int8 (each Linear brings its own matvec: gptmod/decode_step.h).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <vector>

#include "gptmod/cpu_rows.h"
#include "gptmod/decode_attention.h"
#include "gptmod/decode_step.h"
#include "gptmod/dispatch.h"
#include "gptmod/kv_cache.h"

namespace gptmod {
namespace {

using Vec = at::vec::Vectorized<float>;

// out[r] = x[r] / rms(x[r]) * w, x fp32 [B, C] (the model's only RMSNorm in C++: training and
// the plain forward use torch's).
template <typename T>
void rmsnorm(const float* x, const T* w, float* out, int64_t B, int64_t C, float eps) {
  for (int64_t r = 0; r < B; ++r) {
    const float* xr = x + r * C;
    const float ss = at::vec::map_reduce_all<float>([](Vec v) { return v * v; },
                                                    [](Vec a, Vec b) { return a + b; }, xr, C);
    const float inv = 1.f / std::sqrt(ss / float(C) + eps);
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = xr[c] * inv * float(w[c]);
  }
}

template <typename T>
struct Step {
  const DecodeStepParams& p;
  int64_t QKV;                      // (Hq + 2 Hkv) * D
  std::vector<int32_t> lens_after;  // seqlens[b] + 1: the new token's row included

  // Layer l's key (s = 0) or value (s = 1) cache, [B, S, Hkv, D] with batch stride kv_stride[2].
  T* cache(int64_t l, int64_t s) const {
    return static_cast<T*>(p.kv) + l * p.kv_stride[0] + s * p.kv_stride[1];
  }

  void matvec(const float* x, int64_t K, int64_t w, float* y, int64_t M, bool accumulate) const {
    const PackedLinear& lin = p.linears[w];
    lin.matvec(MatvecParams{x, lin.w, y, p.B, K, M, K, M, accumulate, lin.scales, lin.group});
  }

  // qkv [B, QKV] -> RoPE'd q and k in place (rope's own row kernel), k/v appended to the cache at
  // row seqlens[b] (kv_cache_write's copy).
  void rope_and_append(float* qkv, int64_t l) const {
    const int64_t D = p.D, half = D / 2, QD = p.Hq * D, KD = p.Hkv * D, row = p.Hkv * D;
    for (int64_t b = 0; b < p.B; ++b) {
      const int64_t pos = p.seqlens[b];
      const float *c = p.cos + pos * half, *s = p.sin + pos * half;
      float* q = qkv + b * QKV;
      for (int64_t h = 0; h < p.Hq + p.Hkv; ++h) {
        float* v = q + h * D;
        p.interleaved ? vec::rope_row<float, true>(v, v, c, s, D, 1.f)
                      : vec::rope_row<float, false>(v, v, c, s, D, 1.f);
      }
      const int64_t at = b * p.kv_stride[2] + pos * row;
      kv_write_heads(cache(l, 0) + at, D, q + QD, D, p.Hkv, D);
      kv_write_heads(cache(l, 1) + at, D, q + QD + KD, D, p.Hkv, D);
    }
  }

  // out [B, Hq*D]: decode_attention's kernel (online softmax, each K/V row read once per group of
  // query heads) over layer l's cache, q taken from qkv in place, fp32 in and out.
  void attention(const float* qkv, int64_t l, float* out) const {
    DecodeAttentionParams a{};
    a.dtype = p.dtype;
    a.B = p.B, a.Tq = 1, a.Hq = p.Hq, a.Hkv = p.Hkv, a.D = p.D, a.S_max = p.S;
    a.q = qkv;
    a.q_stride_b = QKV, a.q_stride_t = QKV, a.q_stride_h = p.D;
    a.k_cache = cache(l, 0);
    a.v_cache = cache(l, 1);
    a.k_stride_b = a.v_stride_b = p.kv_stride[2];
    a.k_stride_s = a.v_stride_s = p.Hkv * p.D;
    a.k_stride_h = a.v_stride_h = p.D;
    a.cache_seqlens = lens_after.data();
    a.out = out;
    a.scale = p.scale;
    a.fp32_io = true;
    decode_attention_stub.get()(a);
  }

  void run() const {
    const int64_t B = p.B, C = p.C, F = p.F;
    std::vector<float> x(B * C), h(B * C), qkv(B * QKV), att(B * p.Hq * p.D), gu(B * 2 * F),
        a(B * F), logits(B * p.Vp);
    const T* x0 = static_cast<const T*>(p.x);
    for (int64_t i = 0; i < B * C; ++i) x[i] = float(x0[i]);
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
        vec::swiglu_row(gu.data() + r * 2 * F, gu.data() + r * 2 * F + F, a.data() + r * F, F);
      matvec(a.data(), F, 4 * l + 3, x.data(), C, true);
    }
    rmsnorm(x.data(), norm(2 * p.L), h.data(), B, C, p.eps);
    matvec(h.data(), C, 4 * p.L, logits.data(), p.Vp, false);
    if (p.softcap > 0) vec::softcap_row(logits.data(), B * p.Vp, p.softcap);
    T* out = static_cast<T*>(p.logits);
    for (int64_t i = 0; i < B * p.Vp; ++i) out[i] = T(logits[i]);
  }
};

void decode_step_kernel(const DecodeStepParams& p) {
  std::vector<int32_t> lens_after(p.seqlens, p.seqlens + p.B);
  for (auto& n : lens_after) ++n;
  GPTMOD_DISPATCH_DECODE_TYPES(p.dtype, "decode_step", [&] {
    Step<scalar_t>{p, (p.Hq + 2 * p.Hkv) * p.D, std::move(lens_after)}.run();
  });
}

}  // namespace

GPTMOD_REGISTER_KERNEL(decode_step_stub, decode_step_kernel);

}  // namespace gptmod
