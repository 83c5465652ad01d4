// Run-time choice between the per-capability builds of a CPU kernel.
//
// Every file in csrc/cpu/kernels/ is compiled once per capability (DEFAULT, AVX2, AVX512) with
// that capability's -m flags and CPU_CAPABILITY define, the scheme ATen uses for its own kernels
// (aten/src/ATen/native/DispatchStub.h). Each build registers its function into a KernelStub
// slot at library load; call sites ask the stub for the best slot this CPU can run.
//
//   // entry file (csrc/cpu/foo.cpp)          // kernel file (csrc/cpu/kernels/foo_kernel.cpp)
//   GPTMOD_DEFINE_STUB(foo_stub, FooFn);      GPTMOD_REGISTER_KERNEL(foo_stub, foo_kernel);
//   foo_stub.get()(params);
//
// GPTMOD_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 in the environment caps the choice (read once), which
// lets tests run the narrower builds on a wide machine.
#pragma once

#include <cstdlib>
#include <cstring>

namespace gptmod::cpu {

enum Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2, kNumCapabilities = 3 };

inline const char* capability_name(int cap) {
  static const char* names[] = {"DEFAULT", "AVX2", "AVX512"};
  return (cap >= 0 && cap < kNumCapabilities) ? names[cap] : "?";
}

// Highest capability this CPU supports, capped by GPTMOD_CPU_CAPABILITY.
inline int detected_capability() {
  static const int cap = [] {
    int c = kDefault;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) c = kAVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      c = kAVX512;
#endif
    if (const char* env = std::getenv("GPTMOD_CPU_CAPABILITY")) {
      for (int i = 0; i < kNumCapabilities; ++i)
        if (std::strcmp(env, capability_name(i)) == 0 && i < c) c = i;
    }
    return c;
  }();
  return cap;
}

template <typename Fn>
struct KernelStub {
  Fn table[kNumCapabilities] = {};

  // The widest registered build that the CPU can run. DEFAULT is always compiled.
  Fn get() const {
    for (int c = detected_capability(); c >= 0; --c)
      if (table[c]) return table[c];
    return nullptr;
  }
  int chosen() const {
    for (int c = detected_capability(); c >= 0; --c)
      if (table[c]) return c;
    return -1;
  }
};

}  // namespace gptmod::cpu

#define GPTMOD_DECLARE_STUB(name, fn_type) extern ::gptmod::cpu::KernelStub<fn_type> name
#define GPTMOD_DEFINE_STUB(name, fn_type) ::gptmod::cpu::KernelStub<fn_type> name

// Used inside a kernel file; GPTMOD_CPU_CAPABILITY_INDEX comes from CMakeLists.txt.
#define GPTMOD_REGISTER_KERNEL(stub, fn)                                              \
  static const int gptmod_register_##fn = [] {                                       \
    stub.table[GPTMOD_CPU_CAPABILITY_INDEX] = &fn;                                   \
    return 0;                                                                        \
  }()
