// Accumulation (math) type shared by the CPU kernels (csrc/cpu/kernels/*.cpp) and the CUDA
// kernels (csrc/cuda/*.cu): fp32 math for fp32/fp16/bf16 (docs/design.md: math in fp32), fp64 math
// for fp64 (gradcheck needs the full precision). A type-only trait with no code, so it can live
// outside the per-capability inline namespace: every build sees the same definition. No torch
// headers.
#pragma once

namespace gptmod {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

}  // namespace gptmod
