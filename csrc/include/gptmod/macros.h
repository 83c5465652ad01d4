// Function-qualifier macro shared by the headers whose scalar helpers are compiled both by nvcc
// (for host and device) and by the plain C++ compiler (CPU builds). No torch headers.
#pragma once

#if defined(__CUDACC__)
#define GPTMOD_HD __host__ __device__ __forceinline__
#else
#define GPTMOD_HD inline
#endif
