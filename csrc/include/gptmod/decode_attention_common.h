// Split-KV bookkeeping and scalar softmax math shared by the CPU kernel (csrc/cpu/kernels/
// decode_attention_kernel.cpp) and the CUDA kernels (csrc/cuda/decode_attention.cu), so both
// backends cut sequences and merge partial results the same way. No torch headers: nvcc and
// the three CPU capability builds include it cheaply.
//
// Split-KV ("flash-decoding"): a sequence of length L is cut into num_splits chunks of
// `chunk = ceil(max_len / num_splits)` rows. The CPU kernel uses the batch's longest length for
// every sequence; the CUDA kernel, which cannot read the lengths on the host, uses each
// sequence's own L (so no split of a short sequence idles); either way split s's partial
// results live at a fixed index. Split s covers rows [s*chunk, min((s+1)*chunk, L)), which
// is empty for short sequences in a ragged batch; an empty split reports lse = -inf and is
// ignored by the merge. Each split writes its normalised output o_s and lse_s = m_s + log(l_s);
// the merge computes out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M), M = max_s lse_s
// (the combine step of FlashAttention's split-KV decoding and FlashInfer's merge_states).
#pragma once
#include <cmath>
#include <cstdint>

#include "gptmod/macros.h"

namespace gptmod {

// Rows per split for a batch whose longest sequence has max_len rows (>= 1 split).
GPTMOD_HD int64_t attention_split_chunk(int64_t max_len, int64_t num_splits) {
  return num_splits <= 1 ? max_len : (max_len + num_splits - 1) / num_splits;
}

// [first, last) rows of split s for a sequence of `len` valid rows; first >= last means empty.
GPTMOD_HD void attention_split_range(int64_t len, int64_t chunk, int64_t s, int64_t* first,
                                     int64_t* last) {
  const int64_t f = s * chunk;
  const int64_t l = f + chunk < len ? f + chunk : len;
  *first = f;
  *last = l;
}

// Number of cache rows query t (of Tq) may attend: bottom-right causal alignment puts it at
// position len - Tq + t, so it sees rows 0 .. len - Tq + t. Clamped to [0, len], which keeps a
// kernel in bounds even for lengths that the CPU entry point would have refused.
GPTMOD_HD int64_t attention_visible_rows(int64_t len, int64_t Tq, int64_t t) {
  const int64_t n = len - Tq + t + 1;
  return n < 0 ? 0 : (n > len ? len : n);
}

// s = softcap * tanh(x / softcap) for softcap > 0, else x. x is already multiplied by scale.
GPTMOD_HD float attention_softcap(float x, float softcap) {
  return softcap > 0.f ? softcap * tanhf(x / softcap) : x;
}
GPTMOD_HD double attention_softcap(double x, double softcap) {
  return softcap > 0. ? softcap * tanh(x / softcap) : x;
}

// CPU split heuristic. Work items are (batch, KV head, split); with fewer items than threads,
// or a count that leaves threads idle in the last round, split the sequences so every thread
// has an equal share, but keep at least min_rows rows per split so the merge stays cheap.
inline int64_t decode_attention_cpu_num_splits(int64_t B, int64_t Hkv, int64_t max_len,
                                               int64_t num_threads) {
  constexpr int64_t min_rows = 256;
  const int64_t items = B * Hkv;
  if (items <= 0 || num_threads <= 1 || max_len < 2 * min_rows) return 1;
  const int64_t max_splits = max_len / min_rows;
  for (int64_t s = 1; s <= 16 && s <= max_splits; ++s) {
    const int64_t n = items * s;
    if (n % num_threads == 0 || n >= 4 * num_threads) return s;
  }
  return max_splits < 16 ? max_splits : 16;
}

// CUDA split heuristic (flash-decoding): B * Hkv blocks alone leave most SMs idle at small
// batch, so split each sequence until the grid fills one wave of resident blocks (`slots` =
// SMs x blocks of this kernel one SM holds, from the occupancy API), keeping at least two K/V
// tiles per split of the longest possible sequence (the lengths are on the device, so S_max
// bounds the work; each block then cuts its own sequence's length into that many splits).
inline int64_t decode_attention_cuda_num_splits(int64_t items, int64_t S_max, int64_t tile_rows,
                                                int64_t slots) {
  if (items <= 0 || S_max <= 0) return 1;
  int64_t splits = (slots + items - 1) / items;
  const int64_t by_len = S_max / (2 * tile_rows);
  if (splits > by_len) splits = by_len;
  if (splits > 256) splits = 256;
  return splits < 1 ? 1 : splits;
}

}  // namespace gptmod
