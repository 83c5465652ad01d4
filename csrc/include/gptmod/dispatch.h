// The one place where a run-time dtype becomes a template argument, for the CPU kernels (each
// capability build), the CPU entry points and the CUDA launchers alike; the idea of vLLM's
// csrc/dispatch_utils.h. Inside the body `scalar_t` is the C++ type of the dtype:
//
//   GPTMOD_DISPATCH_FLOATING_TYPES(p.dtype, "rope", [&] { rope_impl<scalar_t>(p); });
//
// The sets follow the ops' contracts (docs/design.md section 2):
//   GPTMOD_DISPATCH_FLOATING_TYPES            float32, float16, bfloat16, float64 (the elementwise
//                                             ops and decode_attention on CPU; fp64 for gradcheck)
//   GPTMOD_DISPATCH_REDUCED_FLOATING_TYPES    float32, float16, bfloat16 (CUDA decode_attention)
//   GPTMOD_DISPATCH_DECODE_TYPES              float32, bfloat16 (the fused CPU decode step's
//                                             activations-side dtypes: weights, norms, caches)
// Built on ATen's AT_DISPATCH_SWITCH / AT_DISPATCH_CASE, so a dtype outside the set raises the
// same NotImplementedError as an ATen kernel would (the entry points check dtypes first, with
// messages that name the argument, so users never see it).
#pragma once

#include <ATen/Dispatch.h>

#define GPTMOD_DISPATCH_CASE_REDUCED_FLOATING_TYPES(...)   \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)     \
  AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)      \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

#define GPTMOD_DISPATCH_CASE_FLOATING_TYPES(...)           \
  GPTMOD_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__) \
  AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__)

#define GPTMOD_DISPATCH_CASE_DECODE_TYPES(...)             \
  AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)     \
  AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__)

#define GPTMOD_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, GPTMOD_DISPATCH_CASE_FLOATING_TYPES(__VA_ARGS__))

#define GPTMOD_DISPATCH_REDUCED_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, GPTMOD_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

#define GPTMOD_DISPATCH_DECODE_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, GPTMOD_DISPATCH_CASE_DECODE_TYPES(__VA_ARGS__))
