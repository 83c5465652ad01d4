// Parameters and scalar math shared by the cross_entropy entry points (csrc/cpu/cross_entropy.cpp,
// csrc/cuda/cross_entropy.cu) and the per-capability CPU kernels
// (csrc/cpu/kernels/cross_entropy_kernel.cpp). Light on purpose: kernel files are compiled
// three times.
//
// Per row of logits [rows, V] (the raw lm_head outputs) with target t:
//   z = cap * tanh(raw / cap) when softcap cap > 0, else raw;
//   lse = log sum_j exp(z_j),  row loss = lse - z_t;  loss = mean over rows with t != ignore_index.
// Gradient with respect to raw, scale = grad_loss / (rows counted):
//   scale * (exp(z_j - lse) - [j == t]) * (cap > 0 ? 1 - (z_j / cap)^2 : 1); 0 on ignored rows.
#pragma once
#include <cstdint>

#include <c10/core/ScalarType.h>

#include "gptmod/cpu_dispatch.h"
#include "gptmod/elementwise_math.h"
#include "gptmod/macros.h"
#include "gptmod/row_layout.h"

namespace gptmod {

struct CrossEntropyParams {
  c10::ScalarType dtype;   // logits and grad
  int64_t rows;
  int64_t V;
  double softcap;          // 0: off
  int64_t ignore_index;
  const void* logits;      // [rows, V] by logits_rows
  RowLayout logits_rows;
  const int64_t* targets;  // [rows] contiguous, each in [0, V) or ignore_index
  void* lse;               // forward: [rows] out; backward: [rows] in (accumulation type)
  void* row_loss;          // forward: [rows] accumulation type, lse - z_t (0 when ignored)
  const void* scale;       // backward: 0-d accumulation type, grad_loss / rows counted
  void* grad;              // backward: [rows, V] contiguous, logits' dtype
};

// The soft-capped logit and the derivative of the cap, shared by both backends' scalar paths.
template <typename acc_t>
GPTMOD_HD acc_t softcap_logit(acc_t raw, acc_t cap) {
  return cap > acc_t(0) ? cap * gptmod_tanh(raw / cap) : raw;
}
template <typename acc_t>
GPTMOD_HD acc_t softcap_grad(acc_t z, acc_t cap) {
  return cap > acc_t(0) ? acc_t(1) - (z / cap) * (z / cap) : acc_t(1);
}

using CrossEntropyFn = void (*)(const CrossEntropyParams&);
GPTMOD_DECLARE_STUB(cross_entropy_fwd_stub, CrossEntropyFn);
GPTMOD_DECLARE_STUB(cross_entropy_bwd_stub, CrossEntropyFn);

}  // namespace gptmod
