// decode_attention on CUDA: split-KV GQA decode attention over a preallocated, strided KV cache.
//
// Two kernels:
//   decode_attention_split_kernel  one block per (split, KV head, batch). The block streams its
//       split's K/V rows through shared memory in tiles (cp.async, 16-byte chunks, two stages so
//       the next tile loads while the current one is used) and every query row of the group
//       (G = Hq / Hkv heads x Tq queries) reads the same tile: each K/V byte leaves global memory
//       once per group. fp32 online softmax in the exp2 domain (q pre-multiplied by scale*log2e).
//   decode_attention_merge_kernel  with num_splits > 1, merges the per-split (output, lse) pairs
//       with log-sum-exp weights.
// Ideas from FlashInfer's decode kernel (include/flashinfer/attention/decode.cuh: lanes along the
// head dim holding 16-byte vectors, query heads of a group sharing a K/V tile, partial states
// merged across row slices), FlashAttention's split-KV "flash-decoding" combine, and vLLM's
// paged_attention (one block per (head, sequence, partition), a separate reduce kernel). No code
// is taken from them.
//
// Lengths live on the device, so nothing here reads them on the host: the number of splits is
// chosen from S_max, while each block cuts its own sequence's length into that many chunks (so a
// ragged batch has no splits left idle by a short sequence), and the kernels clamp
// cache_seqlens[b] to [0, S_max] (the CPU entry point checks the values instead) so every access
// stays inside the cache whatever the values.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_pipeline_primitives.h>
#include <torch/library.h>

#include "gptmod/cuda_utils.cuh"
#include "gptmod/decode_attention_checks.h"
#include "gptmod/decode_attention_common.h"
#include "gptmod/dispatch.h"

namespace gptmod {
namespace {

constexpr int kThreads = 256;       // per block of the split kernel
constexpr int kTileBytes = 8192;    // K (or V) tile bytes per stage: 2 stages x (K + V) = 32 KB
constexpr float kLog2e = 1.4426950408889634f;

constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Thread layout for a head-dim bound kDim: the exact D of the 64 / 128 instances, else the
// smallest of 32, 64, 128, 256 that holds D (so D = 96 uses 12 of 16 lanes, not 12 of 32).
//   kVec   elements per 16-byte chunk (8 for fp16/bf16, 4 for fp32)
//   kTx    lanes per "row group": the lanes that share one dot product, each owning kNv chunks
//          (chunk c * kTx + lane) of the row; a power of two <= 32 so the reduction is a few
//          __shfl_xor_sync within the warp
//   kRows  row groups per block; each takes one query row and a slice of the tile's rows
//   kTile  K/V rows per tile
template <typename scalar_t, int kDim>
struct Layout {
  static constexpr int kVec = 16 / int(sizeof(scalar_t));
  static constexpr int kChunks = (kDim + kVec - 1) / kVec;
  static constexpr int kTx = kChunks >= 32 ? 32 : next_pow2(kChunks);
  static constexpr int kNv = (kChunks + kTx - 1) / kTx;
  static constexpr int kRows = kThreads / kTx;
  static constexpr int kTile =
      kTileBytes / (kDim * int(sizeof(scalar_t))) < 8 ? 8 : kTileBytes / (kDim * int(sizeof(scalar_t)));
};

struct SplitParams {
  const void* q;  // [B, Tq, Hq, D], strided (last dim stride 1)
  int64_t q_sb, q_st, q_sh;
  const void* k;  // [B, S_max, Hkv, D], strided (last dim stride 1)
  int64_t k_sb, k_ss, k_sh;
  const void* v;  // [B, S_max, Hkv, D], strided (last dim stride 1)
  int64_t v_sb, v_ss, v_sh;
  const int32_t* seqlens;  // [B]
  void* out;               // [B, Tq, Hq, D] contiguous (written when num_splits == 1)
  float* ws_out;           // [B, Hkv, num_splits, NQ, D] normalised partial outputs
  float* ws_lse;           // [B, Hkv, num_splits, NQ] log2-domain lse (-inf: no rows)
  int64_t S_max;
  int Tq, Hq, Hkv, D, G, num_splits;
  float qmul;     // scale * log2e without softcap, scale with it
  float softcap;  // 0 = off
  bool aligned;   // every K/V row starts on a 16-byte boundary: cp.async 16-byte chunks
};

/*
 * decode_attention_split_kernel<scalar_t, kDim, kExactDim, kGroup>
 *   grid  (num_splits, Hkv, B); block kThreads = 256 threads = kRows row groups x kTx lanes.
 *   Head dim D = kDim when kExactDim, else runtime D <= kDim. Group size G = kGroup, or runtime
 *   when kGroup = 0.
 *   Query rows of the block: i = t * G + g (head kvh * G + g, query t), NQ = G * Tq of them,
 *   handled NQC = min(NQ, kRows) at a time. Row group r takes query y = r % NQC and row slice
 *   z = r / NQC (rows z, z + NZ, ... of each tile, NZ = kRows / NQC); groups with z >= NZ idle.
 *   Shared memory: 2 stages x {K, V} x [kTile][DP] scalar_t tiles (DP = D rounded up to a
 *   16-byte chunk, zero-padded), then the combine area: m, l [kRows] and acc [kRows][DP] fp32.
 *   Each row group keeps an online softmax (m, l in log2 units, acc over its lanes' elements);
 *   at the end of a query chunk the NZ slices of each query are merged through shared memory.
 *   Split s covers rows [s * chunk, min((s + 1) * chunk, len)) with chunk = ceil(len /
 *   num_splits) of this sequence's own length; query t sees rows < len - Tq + t + 1
 *   (attention_visible_rows), and a query chunk streams tiles only up to the last row its
 *   latest query sees, so rows >= len are never loaded and a chunk early in the prompt reads
 *   only the prefix it can see.
 *   Output: out[b, t, h, :] (num_splits == 1) or ws_out / ws_lse (merged later).
 */
template <typename scalar_t, int kDim, bool kExactDim, int kGroup>
__global__ void __launch_bounds__(kThreads) decode_attention_split_kernel(const SplitParams p) {
  using L = Layout<scalar_t, kDim>;
  constexpr int VEC = L::kVec, TX = L::kTx, NV = L::kNv, R = L::kRows, TILE = L::kTile;
  const int D = kExactDim ? kDim : p.D;
  const int G = kGroup > 0 ? kGroup : p.G;
  const int CH = (D + VEC - 1) / VEC;  // 16-byte chunks per row
  const int DP = CH * VEC;             // row length in shared memory
  const int split = blockIdx.x, kvh = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % TX, r = tid / TX;
  const int NQ = G * p.Tq;
  const int NQC = NQ < R ? NQ : R;
  const int NZ = R / NQC;
  const int y = r % NQC, z = r / NQC;

  // Clamped length: in bounds for any value of cache_seqlens.
  int64_t len = p.seqlens[b];
  len = len < 0 ? 0 : (len > p.S_max ? p.S_max : len);
  int64_t first = 0, last = len;
  if (p.num_splits > 1)
    attention_split_range(len, attention_split_chunk(len, p.num_splits), split, &first, &last);

  const int64_t ws_base = ((b * p.Hkv + kvh) * p.num_splits + split) * NQ;  // row of ws_lse
  if (first >= last) {
    // Empty split (a sequence shorter than num_splits rows): lse = -inf tells the merge to skip
    // it, so its ws_out rows are left unwritten. With a single split this means len == 0 (only
    // for lengths the CPU would refuse): the output is zero.
    if (p.num_splits > 1) {
      for (int i = tid; i < NQ; i += kThreads) p.ws_lse[ws_base + i] = -INFINITY;
    } else {
      for (int64_t e = tid; e < int64_t(NQ) * D; e += kThreads) {
        const int i = int(e / D), d = int(e % D);
        const int t = i / G, h = kvh * G + i % G;
        static_cast<scalar_t*>(p.out)[((b * p.Tq + t) * p.Hq + h) * D + d] = scalar_t(0.f);
      }
    }
    return;
  }

  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* tiles = reinterpret_cast<scalar_t*>(smem_raw);  // [2][2][TILE][DP]
  float* comb_m = reinterpret_cast<float*>(tiles + 4 * TILE * DP);  // [R]
  float* comb_l = comb_m + R;                                     // [R]
  float* comb_acc = comb_l + R;                                   // [R][DP]

  const scalar_t* kbase = static_cast<const scalar_t*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const scalar_t* vbase = static_cast<const scalar_t*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // Rows [j0, j0 + n) of K and V into stage `stage`, then one commit group. Whole aligned
  // chunks go through cp.async; a partial last chunk (D not a multiple of kVec) or a misaligned
  // view falls back to element copies, zero-padded so the padding never feeds a NaN into a dot.
  auto load_tile = [&](int stage, int64_t j0, int n) {
    scalar_t* ks = tiles + (stage * 2) * TILE * DP;
    scalar_t* vs = ks + TILE * DP;
    for (int e = tid; e < n * CH; e += kThreads) {
      const int j = e / CH, c = e % CH;
      const scalar_t* ksrc = kbase + (j0 + j) * p.k_ss + c * VEC;
      const scalar_t* vsrc = vbase + (j0 + j) * p.v_ss + c * VEC;
      scalar_t* kdst = ks + j * DP + c * VEC;
      scalar_t* vdst = vs + j * DP + c * VEC;
      if (p.aligned && (c + 1) * VEC <= D) {
        __pipeline_memcpy_async(kdst, ksrc, 16);
        __pipeline_memcpy_async(vdst, vsrc, 16);
      } else {
        for (int u = 0; u < VEC; ++u) {
          const bool in = c * VEC + u < D;
          kdst[u] = in ? ksrc[u] : scalar_t(0.f);
          vdst[u] = in ? vsrc[u] : scalar_t(0.f);
        }
      }
    }
    __pipeline_commit();
  };

  for (int qc = 0; qc < NQ; qc += NQC) {
    const int i = qc + y;
    const bool q_active = z < NZ && i < NQ;
    float qr[NV][VEC], acc[NV][VEC];
    int64_t row_end = 0;  // this query sees rows < row_end (absolute)
    if (q_active) {
      const int t = i / G, h = kvh * G + i % G;
      const scalar_t* qp = static_cast<const scalar_t*>(p.q) + b * p.q_sb + t * p.q_st + h * p.q_sh;
#pragma unroll
      for (int c = 0; c < NV; ++c)
#pragma unroll
        for (int u = 0; u < VEC; ++u) {
          const int d = (c * TX + lane) * VEC + u;
          qr[c][u] = d < D ? static_cast<float>(qp[d]) * p.qmul : 0.f;
        }
      row_end = attention_visible_rows(len, p.Tq, t);
      if (row_end > last) row_end = last;
    }
#pragma unroll
    for (int c = 0; c < NV; ++c)
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[c][u] = 0.f;
    float m = -INFINITY, l = 0.f;

    // The chunk's latest query (largest t) sees the most rows; tiles past its last row hold
    // nothing for any query of the chunk. Uniform over the block, so the barriers below are too.
    const int t_hi = ((qc + NQC < NQ ? qc + NQC : NQ) - 1) / G;
    const int64_t chunk_end = std::min<int64_t>(last, attention_visible_rows(len, p.Tq, t_hi));
    const int64_t n_rows = chunk_end > first ? chunk_end - first : 0;
    const int64_t n_tiles = (n_rows + TILE - 1) / TILE;

    if (n_tiles > 0) load_tile(0, first, int(n_rows < TILE ? n_rows : TILE));
    for (int64_t tt = 0; tt < n_tiles; ++tt) {
      const int64_t j0 = first + tt * TILE;
      const int n = int(chunk_end - j0 < TILE ? chunk_end - j0 : TILE);
      if (tt + 1 < n_tiles) {
        const int64_t rest = chunk_end - j0 - TILE;
        load_tile(int((tt + 1) & 1), j0 + TILE, int(rest < TILE ? rest : TILE));
      } else {
        __pipeline_commit();  // empty group: keeps "all but the newest group" = this tile
      }
      __pipeline_wait_prior(1);
      __syncthreads();
      const scalar_t* ks = tiles + int(tt & 1) * 2 * TILE * DP;
      const scalar_t* vs = ks + TILE * DP;
      // Same trip count for every thread: the shuffles below need the whole warp.
      const int iters = (n + NZ - 1) / NZ;
      for (int jj = 0; jj < iters; ++jj) {
        const int j = z + jj * NZ;
        const bool active = q_active && j < n && j0 + j < row_end;
        float s = 0.f;
        if (active) {
#pragma unroll
          for (int c = 0; c < NV; ++c) {
            const int ch = c * TX + lane;
            if (ch < CH) {
              float kf[VEC];
              cuda::load_vec<scalar_t, VEC>(ks + j * DP + ch * VEC, kf);  // one LDS.128
#pragma unroll
              for (int u = 0; u < VEC; ++u) s = fmaf(qr[c][u], kf[u], s);
            }
          }
        }
#pragma unroll
        for (int off = TX / 2; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (active) {
          // s is scale*q.k (softcap) or scale*log2e*q.k (no softcap); bring both to log2 units.
          if (p.softcap > 0.f) s = attention_softcap(s, p.softcap) * kLog2e;
          const float m_new = fmaxf(m, s);
          const float alpha = exp2f(m - m_new);  // 0 on the first row (m = -inf)
          const float pr = exp2f(s - m_new);
          l = l * alpha + pr;
          m = m_new;
#pragma unroll
          for (int c = 0; c < NV; ++c) {
            const int ch = c * TX + lane;
            if (ch < CH) {
              float vf[VEC];
              cuda::load_vec<scalar_t, VEC>(vs + j * DP + ch * VEC, vf);  // one LDS.128
#pragma unroll
              for (int u = 0; u < VEC; ++u) acc[c][u] = fmaf(pr, vf[u], acc[c][u] * alpha);
            }
          }
        }
      }
      __syncthreads();  // the next iteration's load overwrites the other stage's twin
    }
    __pipeline_wait_prior(0);

    // Merge the NZ row slices of each query of this chunk (log-sum-exp over slices).
    if (q_active) {
      if (lane == 0) {
        comb_m[r] = m;
        comb_l[r] = l;
      }
#pragma unroll
      for (int c = 0; c < NV; ++c) {
        const int ch = c * TX + lane;
        if (ch < CH)
#pragma unroll
          for (int u = 0; u < VEC; ++u) comb_acc[r * DP + ch * VEC + u] = acc[c][u];
      }
    }
    __syncthreads();
    for (int e = tid; e < NQC * D; e += kThreads) {  // NQC <= kRows: no overflow
      const int yy = e / D, d = e % D, ii = qc + yy;
      if (ii >= NQ) continue;
      float M = -INFINITY;
      for (int zz = 0; zz < NZ; ++zz) M = fmaxf(M, comb_m[zz * NQC + yy]);
      float lsum = 0.f, o = 0.f;
      if (M != -INFINITY) {
        for (int zz = 0; zz < NZ; ++zz) {
          const int rr = zz * NQC + yy;
          const float w = exp2f(comb_m[rr] - M);  // 0 for a slice without rows
          lsum += w * comb_l[rr];
          o += w * comb_acc[rr * DP + d];
        }
      }
      const float val = lsum > 0.f ? o / lsum : 0.f;
      if (p.num_splits > 1) {
        p.ws_out[(ws_base + ii) * D + d] = val;
        if (d == 0) p.ws_lse[ws_base + ii] = lsum > 0.f ? M + log2f(lsum) : -INFINITY;
      } else {
        const int t = ii / G, h = kvh * G + ii % G;
        static_cast<scalar_t*>(p.out)[((b * p.Tq + t) * p.Hq + h) * D + d] = static_cast<scalar_t>(val);
      }
    }
    __syncthreads();  // comb_* and the tiles are reused by the next query chunk
  }
}

/*
 * decode_attention_merge_kernel<scalar_t>
 *   grid  B * Hkv * NQ blocks, one per query row (b, kvh, i); block merge_threads(D) threads
 *   along D.
 *   out[b, t, h, d] = sum_s 2^(lse_s - M) ws_out[s, d] / sum_s 2^(lse_s - M), M = max_s lse_s;
 *   splits with lse = -inf (no rows) weigh nothing.
 */
template <typename scalar_t>
__global__ void decode_attention_merge_kernel(
    const float* __restrict__ ws_out,  // [B, Hkv, num_splits, NQ, D]
    const float* __restrict__ ws_lse,  // [B, Hkv, num_splits, NQ]
    scalar_t* __restrict__ out,        // [B, Tq, Hq, D] contiguous
    int Tq, int Hq, int Hkv, int G, int D, int num_splits) {
  const int NQ = G * Tq;
  const int64_t row = blockIdx.x;
  const int i = int(row % NQ), kvh = int((row / NQ) % Hkv);
  const int64_t b = row / (int64_t(NQ) * Hkv);
  const int64_t base = (b * Hkv + kvh) * num_splits;  // split 0 of this (b, kvh)
  float M = -INFINITY;
  for (int s = 0; s < num_splits; ++s) M = fmaxf(M, ws_lse[(base + s) * NQ + i]);
  const int t = i / G, h = kvh * G + i % G;
  scalar_t* dst = out + ((b * Tq + t) * Hq + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float wsum = 0.f, o = 0.f;
    if (M != -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        const float lse = ws_lse[(base + s) * NQ + i];
        if (lse == -INFINITY) continue;
        const float w = exp2f(lse - M);
        wsum += w;
        o += w * ws_out[((base + s) * NQ + i) * D + d];
      }
    }
    dst[d] = static_cast<scalar_t>(wsum > 0.f ? o / wsum : 0.f);
  }
}

// Group size -> compile-time constant (1, 2, 4, 8; 0 = runtime, e.g. 3, 6, 16).
#define GPTMOD_DISPATCH_GROUP(G, NAME, ...)        \
  [&] {                                            \
    switch (G) {                                   \
      case 1: {                                    \
        constexpr static int NAME = 1;             \
        return __VA_ARGS__();                      \
      }                                            \
      case 2: {                                    \
        constexpr static int NAME = 2;             \
        return __VA_ARGS__();                      \
      }                                            \
      case 4: {                                    \
        constexpr static int NAME = 4;             \
        return __VA_ARGS__();                      \
      }                                            \
      case 8: {                                    \
        constexpr static int NAME = 8;             \
        return __VA_ARGS__();                      \
      }                                            \
      default: {                                   \
        constexpr static int NAME = 0;             \
        return __VA_ARGS__();                      \
      }                                            \
    }                                              \
  }()

int num_sms(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n > 0 ? n : 1;
  }
  return cache[device];
}

using SplitKernel = void (*)(const SplitParams);

// Blocks of `kernel` with `smem` bytes of shared memory that one SM holds at once (registers,
// shared memory and threads all counted by the occupancy API), cached: it is asked per call.
int resident_blocks(SplitKernel kernel, size_t smem, int device) {
  struct Entry {
    SplitKernel kernel;
    size_t smem;
    int device, blocks;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  const std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.smem == smem && e.device == device) return e.blocks;
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  cache.push_back({kernel, smem, device, n > 0 ? n : 1});
  return cache.back().blocks;
}

// Merge block size: D rounded up to whole warps (D = 64 -> 64 threads, none idle).
int merge_threads(int D) { return std::min(256, (D + 31) / 32 * 32); }

bool row_aligned(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0 &&
         (t.stride(1) * es) % 16 == 0 && (t.stride(2) * es) % 16 == 0;
}

// One head-dim instance: picks the group-size instance, the split count and launches.
template <typename scalar_t, int kDim, bool kExactDim>
void launch_dim(SplitParams& p, int64_t B, int64_t requested_splits, const at::Tensor& q,
                at::Tensor& out, cudaStream_t stream) {
  using L = Layout<scalar_t, kDim>;
  SplitKernel kernel;
  if constexpr (kExactDim) {
    kernel = GPTMOD_DISPATCH_GROUP(p.G, kGroup, [&] {
      return &decode_attention_split_kernel<scalar_t, kDim, true, kGroup>;
    });
  } else {
    kernel = &decode_attention_split_kernel<scalar_t, kDim, false, 0>;
  }
  const int DP = (p.D + L::kVec - 1) / L::kVec * L::kVec;
  const size_t smem = size_t(4) * L::kTile * DP * sizeof(scalar_t) + size_t(L::kRows) * (DP + 2) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "decode_attention: internal error, shared memory ", smem);
  const int device = q.get_device();
  int64_t splits = requested_splits;
  if (splits == 0) {
    const int64_t slots = int64_t(num_sms(device)) * resident_blocks(kernel, smem, device);
    splits = decode_attention_cuda_num_splits(B * p.Hkv, p.S_max, L::kTile, slots);
  }
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, std::max<int64_t>(p.S_max, 1)));
  TORCH_CHECK(splits <= 65535, "decode_attention: num_splits must be <= 65535 on CUDA, got ", splits);
  p.num_splits = int(splits);
  const int64_t NQ = int64_t(p.G) * p.Tq;
  at::Tensor ws_out, ws_lse;
  if (splits > 1) {
    ws_out = at::empty({B, p.Hkv, splits, NQ, p.D}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({B, p.Hkv, splits, NQ}, q.options().dtype(at::kFloat));
    p.ws_out = ws_out.data_ptr<float>();
    p.ws_lse = ws_lse.data_ptr<float>();
  }
  const dim3 grid(unsigned(splits), unsigned(p.Hkv), unsigned(B));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    decode_attention_merge_kernel<scalar_t><<<unsigned(B * p.Hkv * NQ), merge_threads(p.D), 0, stream>>>(
        p.ws_out, p.ws_lse, out.data_ptr<scalar_t>(), p.Tq, p.Hq, p.Hkv, p.G, p.D, p.num_splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Head dim -> instance: exact 64 and 128 (q and acc fully unrolled), else the smallest generic
// bound that holds D, so the lanes of a row group match the row's chunks.
template <typename scalar_t>
void launch(SplitParams& p, int64_t B, int64_t requested_splits, const at::Tensor& q,
            at::Tensor& out, cudaStream_t stream) {
  if (p.D == 64) return launch_dim<scalar_t, 64, true>(p, B, requested_splits, q, out, stream);
  if (p.D == 128) return launch_dim<scalar_t, 128, true>(p, B, requested_splits, q, out, stream);
  if (p.D <= 32) return launch_dim<scalar_t, 32, false>(p, B, requested_splits, q, out, stream);
  if (p.D <= 64) return launch_dim<scalar_t, 64, false>(p, B, requested_splits, q, out, stream);
  if (p.D <= 128) return launch_dim<scalar_t, 128, false>(p, B, requested_splits, q, out, stream);
  return launch_dim<scalar_t, 256, false>(p, B, requested_splits, q, out, stream);
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                 double scale, double softcap, int64_t num_splits) {
  check_decode_attention_args(q, k_cache, v_cache, cache_seqlens);
  check_decode_attention_cuda_args(q);
  check_decode_attention_num_splits(num_splits);
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t S_max = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(B <= 65535 && Hkv <= 65535 && B * Hq * Tq < (int64_t(1) << 31),
              "decode_attention: on CUDA B and Hkv must be <= 65535 and B * Tq * Hq < 2^31, got B=",
              B, ", Hkv=", Hkv, ", Tq=", Tq, ", Hq=", Hq);
  c10::cuda::CUDAGuard guard(q.device());
  cuda::check_device_arch(q.get_device());
  auto out = at::empty({B, Tq, Hq, D}, q.options());
  if (out.numel() == 0) return out;
  const at::Tensor lens = cache_seqlens.contiguous();

  SplitParams p{};
  p.q = q.const_data_ptr();
  p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2);
  p.k = k_cache.const_data_ptr();
  p.k_sb = k_cache.stride(0), p.k_ss = k_cache.stride(1), p.k_sh = k_cache.stride(2);
  p.v = v_cache.const_data_ptr();
  p.v_sb = v_cache.stride(0), p.v_ss = v_cache.stride(1), p.v_sh = v_cache.stride(2);
  p.seqlens = lens.const_data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.S_max = S_max;
  p.Tq = int(Tq), p.Hq = int(Hq), p.Hkv = int(Hkv), p.D = int(D), p.G = int(Hq / Hkv);
  p.softcap = softcap > 0 ? float(softcap) : 0.f;
  p.qmul = p.softcap > 0.f ? float(scale) : float(scale) * kLog2e;
  p.aligned = row_aligned(k_cache) && row_aligned(v_cache);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GPTMOD_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "decode_attention_cuda", [&] {
    launch<scalar_t>(p, B, num_splits, q, out, stream);
  });
  return out;
}

/*
 * kv_cache_write_kernel<T>: one thread per element of k_new / v_new (grid-stride), T an unsigned
 * integer of the element size (a bit copy). Row cache_seqlens[b] + t; a row outside [0, S_max) is
 * skipped, so bad lengths cannot write out of bounds (the GPU does not check values: that would
 * need a host sync). Reads are coalesced along D; writes too (rows have stride 1 in D).
 */
template <typename T>
__global__ void kv_cache_write_kernel(T* __restrict__ k_cache,        // [B, S_max, Hkv, D]
                                      T* __restrict__ v_cache,        // [B, S_max, Hkv, D]
                                      const T* __restrict__ k_new,    // [B, Tn, Hkv, D]
                                      const T* __restrict__ v_new,    // [B, Tn, Hkv, D]
                                      const int32_t* __restrict__ seqlens,  // [B]
                                      int64_t kc_sb, int64_t kc_ss, int64_t kc_sh,
                                      int64_t vc_sb, int64_t vc_ss, int64_t vc_sh,
                                      int64_t kn_sb, int64_t kn_st, int64_t kn_sh,
                                      int64_t vn_sb, int64_t vn_st, int64_t vn_sh,
                                      int64_t Tn, int64_t Hkv, int64_t D, int64_t S_max,
                                      int64_t total) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = idx % D, h = (idx / D) % Hkv, t = (idx / (D * Hkv)) % Tn;
    const int64_t b = idx / (D * Hkv * Tn);
    const int64_t row = int64_t(seqlens[b]) + t;
    if (row < 0 || row >= S_max) continue;
    k_cache[b * kc_sb + row * kc_ss + h * kc_sh + d] = k_new[b * kn_sb + t * kn_st + h * kn_sh + d];
    v_cache[b * vc_sb + row * vc_ss + h * vc_sh + d] = v_new[b * vn_sb + t * vn_st + h * vn_sh + d];
  }
}

template <typename T>
void launch_kv_cache_write(const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& kn,
                           const at::Tensor& vn, const at::Tensor& lens, cudaStream_t stream) {
  const int64_t B = kn.size(0), Tn = kn.size(1), Hkv = kn.size(2), D = kn.size(3);
  const int64_t total = B * Tn * Hkv * D;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  kv_cache_write_kernel<T><<<unsigned(blocks), threads, 0, stream>>>(
      static_cast<T*>(kc.data_ptr()), static_cast<T*>(vc.data_ptr()),
      static_cast<const T*>(kn.const_data_ptr()), static_cast<const T*>(vn.const_data_ptr()),
      lens.const_data_ptr<int32_t>(), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0),
      vc.stride(1), vc.stride(2), kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0),
      vn.stride(1), vn.stride(2), Tn, Hkv, D, kc.size(1), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_cache_write_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& cache_seqlens) {
  check_kv_cache_write_args(k_cache, v_cache, k_new, v_new, cache_seqlens);
  if (k_new.numel() == 0) return;
  c10::cuda::CUDAGuard guard(k_cache.device());
  cuda::check_device_arch(k_cache.get_device());
  const at::Tensor lens = cache_seqlens.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (k_cache.element_size()) {
    case 1: return launch_kv_cache_write<uint8_t>(k_cache, v_cache, k_new, v_new, lens, stream);
    case 2: return launch_kv_cache_write<uint16_t>(k_cache, v_cache, k_new, v_new, lens, stream);
    case 4: return launch_kv_cache_write<uint32_t>(k_cache, v_cache, k_new, v_new, lens, stream);
    case 8: return launch_kv_cache_write<uint64_t>(k_cache, v_cache, k_new, v_new, lens, stream);
    default: TORCH_CHECK(false, "kv_cache_write: unsupported element size ", k_cache.element_size());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(gptmod, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
  m.impl("kv_cache_write", &kv_cache_write_cuda);
}

}  // namespace gptmod
