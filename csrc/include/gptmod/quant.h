// Symmetric int8 quantization of one group of values: the weights once at load (pack_linear_int8,
// csrc/cpu/decode_step.cpp) and the activations of every int8 matvec (csrc/cpu/kernels/
// matvec_kernel.cpp) use this one formula; python/gptmod_ext/reference.py:quantize_int8 is its
// pure-PyTorch twin. scale = max|v| / 127 and q = round(v / scale), rounding half to even (the
// default rounding mode, as torch.round), so |q| <= 127 and an all-zero group has scale 0 and q 0.
// The products of two such groups are exact in int32 (vpdpbusd), and also in fp32 for groups of up
// to 1024 values (1024 * 127 * 127 < 2^24): the portable kernel's sums are the same integers.
#pragma once

#include <cmath>
#include <cstdint>

namespace gptmod {

constexpr int64_t kMaxQuantGroup = 1024;

inline float quant_scale(float amax) { return amax / 127.f; }

inline int8_t quant_value(float v, float scale) {
  return scale > 0.f ? static_cast<int8_t>(std::nearbyint(v / scale)) : int8_t(0);
}

// q[0, n) = quantized v[0, n) with v's own scale, returned; q[n, G) = 0 (the padding of a last
// group cut by K). Plain loops the compiler vectorizes for each capability build; static, so each
// build keeps its own copy (an inline function's copies would be merged into one at link time).
static inline float quantize_group(const float* v, int64_t n, int64_t G, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(v[i]));
  const float s = quant_scale(amax);
  for (int64_t i = 0; i < n; ++i) q[i] = quant_value(v[i], s);
  for (int64_t i = n; i < G; ++i) q[i] = 0;
  return s;
}

}  // namespace gptmod
