// Decode-shaped matrix products over weights packed once, and the fused decode step of a whole
// model (csrc/cpu/decode_step.cpp, kernels in csrc/cpu/kernels/{matvec,decode_step}_kernel.cpp,
// csrc/cpu/bf16/ and csrc/cpu/vnni/). Contract in README.md, "The fused CPU decode step".
//
// Packed layout of a Linear weight W [M, K] (out, in), chosen so that a matrix-vector product
// streams it front to back with one 16-wide vector of outputs per load:
//   fp32  [ceil(M/16), K, 16]            P[n, k, j]       = W[16n + j, k]
//   bf16  [ceil(M/16), ceil(K/2), 32]    P[n, p, 2j + h]  = W[16n + j, 2p + h]  (pairs of inputs,
//                                        the operand order of AVX512-BF16's vdpbf16ps)
//   int8  [ceil(M/16), Kp/4, 64]         P[n, q, 4j + i]  = Wq[16n + j, 4q + i] (quads of inputs,
//                                        the operand order of AVX512-VNNI's vpdpbusd)
//         scales fp32 [ceil(M/16), Kp/G, 16]   S[n, g, j] = s[16n + j, g]
// Rows past M and the input past K are zeros. int8 weights are quantized symmetrically in groups
// of G inputs (Kp = K rounded up to a multiple of G): s = max|W[m, group]| / 127 and
// Wq = round(W / s) (gptmod/quant.h), so W ~ Wq * s.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "gptmod/cpu_dispatch.h"

namespace gptmod {

constexpr int64_t kPackBlock = 16;  // outputs per packed block
constexpr int64_t kInt8Quad = 4;    // int8 inputs per lane of a packed vector (vpdpbusd)

// y[r, :M] (=|+=) x[r, :K] @ W^T for r < N; x and y fp32, row strides ldx / ldy.
struct MatvecParams {
  const float* x;       // [N, ldx]
  const void* w;        // packed (see above): fp32, bf16 or int8
  float* y;             // [N, ldy]
  int64_t N, K, M, ldx, ldy;
  bool accumulate;      // y += instead of y =
  const float* scales = nullptr;  // int8 only: [ceil(M/16), Kp/G, 16]
  int64_t group = 0;              // int8 only: G
};
using MatvecFn = void (*)(const MatvecParams&);

// The rows of x quantized for an int8 matvec, group by group as the weights are (gptmod/quant.h):
// q[r, k] = round(x[r, k] / scale[r, g]) for k in group g, zero past K; sum[r, g] = the sum of
// q over group g (the correction of vpdpbusd's unsigned operand).
struct QuantRows {
  const int8_t* q;      // [N, Kp]
  const float* scale;   // [N, Kp/G]
  const int32_t* sum;   // [N, Kp/G]
};
// The int8 products over quantized rows, exact in int32 per group, then scaled into fp32.
using MatvecInt8Fn = void (*)(const MatvecParams&, const QuantRows&);

GPTMOD_DECLARE_STUB(matvec_f32_stub, MatvecFn);
GPTMOD_DECLARE_STUB(matvec_bf16_stub, MatvecFn);
// Quantizes x's rows, then runs the AVX512-VNNI kernel where vnni_enabled(), else the portable one.
GPTMOD_DECLARE_STUB(matvec_int8_stub, MatvecFn);
// The AVX512-BF16 build (vdpbf16ps) and the AVX512-VNNI build (vpdpbusd), each compiled on its
// own; null where they were not built.
extern MatvecFn matvec_bf16dp_kernel_ptr;
extern MatvecInt8Fn matvec_int8_vnni_kernel_ptr;

// The matvec for packed weights of `dtype` (float32, bfloat16 or int8) that this CPU runs best.
MatvecFn pick_matvec(c10::ScalarType dtype);
// Whether this CPU has AVX512-BF16 and the kernel for it was built (GPTMOD_CPU_CAPABILITY below
// AVX512, or GPTMOD_CPU_BF16DP=0, turn it off).
bool bf16dp_enabled();
// The same for AVX512-VNNI (GPTMOD_CPU_VNNI=0 turns it off).
bool vnni_enabled();

// One packed Linear of the fused step: its weights, int8 scales (else null) and matvec.
struct PackedLinear {
  const void* w;
  const float* scales;
  int64_t group;
  MatvecFn matvec;
};

// One decode step (one new token per row) of a pre-norm RMSNorm / RoPE / GQA / SwiGLU decoder.
struct DecodeStepParams {
  c10::ScalarType dtype;        // norms, KV cache and logits (and float weights): fp32 or bf16
  int64_t B, C, Hq, Hkv, D, F, Vp, L, S;  // S: cache rows per sequence
  float eps, scale, softcap;
  bool interleaved;             // RoPE pairs (2i, 2i+1) instead of (i, i + D/2)
  const void* x;                // [B, C] token embeddings
  const void* const* norms;     // [2L + 1]: ln_1, ln_2 per layer, then ln_f; [C] each
  const PackedLinear* linears;  // [4L + 1]: c_attn, attn c_proj, c_fc, mlp c_proj, then lm_head
  void* kv;                     // the cache: element (l, s, b, t, h, d) at
  int64_t kv_stride[3];         //   l*kv_stride[0] + s*kv_stride[1] + b*kv_stride[2] + (t*Hkv + h)*D + d
  const int32_t* seqlens;       // [B] rows cached before this step (= the new token's position)
  const float* cos;             // [max_pos, D/2]
  const float* sin;
  void* logits;                 // [B, Vp]
};
using DecodeStepFn = void (*)(const DecodeStepParams&);
GPTMOD_DECLARE_STUB(decode_step_stub, DecodeStepFn);

}  // namespace gptmod
