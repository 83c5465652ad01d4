// Decode-shaped matrix products over weights packed once, and the fused decode step of a whole
// model (csrc/cpu/decode_step.cpp, kernels in csrc/cpu/kernels/decode_step_kernel.cpp and
// csrc/cpu/bf16/matvec_bf16dp_kernel.cpp). Contract in README.md, "The fused CPU decode step".
//
// Packed layout of a Linear weight W [M, K] (out, in), chosen so that a matrix-vector product
// streams it front to back with one 16-wide vector of outputs per load:
//   fp32  [ceil(M/16), K, 16]            P[n, k, j]       = W[16n + j, k]
//   bf16  [ceil(M/16), ceil(K/2), 32]    P[n, p, 2j + h]  = W[16n + j, 2p + h]  (pairs of inputs,
//                                        the operand order of AVX512-BF16's vdpbf16ps)
// Rows past M and the input past K are zeros.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "gptmod/cpu_dispatch.h"

namespace gptmod {

constexpr int64_t kPackBlock = 16;  // outputs per packed block

// y[r, :M] (=|+=) x[r, :K] @ W^T for r < N; x and y fp32, row strides ldx / ldy.
struct MatvecParams {
  const float* x;       // [N, ldx]
  const void* w;        // packed (see above), fp32 or bf16
  float* y;             // [N, ldy]
  int64_t N, K, M, ldx, ldy;
  bool accumulate;      // y += instead of y =
};
using MatvecFn = void (*)(const MatvecParams&);

GPTMOD_DECLARE_STUB(matvec_f32_stub, MatvecFn);
GPTMOD_DECLARE_STUB(matvec_bf16_stub, MatvecFn);
// The AVX512-BF16 build (vdpbf16ps), compiled on its own; null where it was not built.
extern MatvecFn matvec_bf16dp_kernel_ptr;

// The matvec for packed weights of `dtype` that this CPU runs best.
MatvecFn pick_matvec(c10::ScalarType dtype);
// Whether this CPU has AVX512-BF16 and the kernel for it was built (GPTMOD_CPU_CAPABILITY below
// AVX512, or GPTMOD_CPU_BF16DP=0, turn it off).
bool bf16dp_enabled();

// One decode step (one new token per row) of a pre-norm RMSNorm / RoPE / GQA / SwiGLU decoder.
struct DecodeStepParams {
  c10::ScalarType dtype;        // weights, norms, KV cache and logits: fp32 or bf16
  int64_t B, C, Hq, Hkv, D, F, Vp, L, S;  // S: cache rows per sequence
  float eps, scale, softcap;
  bool interleaved;             // RoPE pairs (2i, 2i+1) instead of (i, i + D/2)
  const void* x;                // [B, C] token embeddings
  const void* const* norms;     // [2L + 1]: ln_1, ln_2 per layer, then ln_f; [C] each
  const void* const* linears;   // [4L + 1]: c_attn, attn c_proj, c_fc, mlp c_proj, then lm_head
  void* kv;                     // the cache: element (l, s, b, t, h, d) at
  int64_t kv_stride[3];         //   l*kv_stride[0] + s*kv_stride[1] + b*kv_stride[2] + (t*Hkv + h)*D + d
  const int32_t* seqlens;       // [B] rows cached before this step (= the new token's position)
  const float* cos;             // [max_pos, D/2]
  const float* sin;
  void* logits;                 // [B, Vp]
  MatvecFn matvec;
};
using DecodeStepFn = void (*)(const DecodeStepParams&);
GPTMOD_DECLARE_STUB(decode_step_stub, DecodeStepFn);

}  // namespace gptmod
