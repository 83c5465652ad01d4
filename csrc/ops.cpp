// Every schema of the gptmod namespace, in one place. Backends register implementations with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd live in
// python/gptmod_ext/ops.py. The contracts are in docs/design.md section 2.
#include <torch/library.h>

#include "gptmod/cpu_dispatch.h"
#include "gptmod/decode_step.h"

namespace gptmod {

// Which per-capability build the CPU kernels run (DEFAULT, AVX2 or AVX512); for tests and
// benchmark reports.
static std::string cpu_capability() {
  return ::gptmod::cpu::capability_name(::gptmod::cpu::detected_capability());
}

TORCH_LIBRARY(gptmod, m) {
  // Rotary position embedding of x [B, T, H, D] by tables cos/sin [max_pos, D/2]; out of place.
  m.def("rope(Tensor x, Tensor cos, Tensor sin, Tensor? positions=None, "
        "bool interleaved=False, bool inverse=False) -> Tensor");
  // The same rotation written into x.
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? positions=None, "
        "bool interleaved=False, bool inverse=False) -> ()");
  // silu(gate) * up for gate_up [..., 2F] = [gate | up] -> [..., F].
  m.def("swiglu(Tensor gate_up) -> Tensor");
  // Gradient of swiglu with respect to gate_up, recomputing sigmoid(gate): -> [..., 2F].
  m.def("swiglu_backward(Tensor grad_out, Tensor gate_up) -> Tensor");
  // RMSNorm of x [..., C] by weight [C] (fp32, or x's dtype): out = x * rstd * weight in out_dtype
  // (x's by default; bf16/fp16 for an fp32 x, the next matmul's autocast dtype), and rstd [...]
  // fp32 (fp64 for fp64 x) = 1 / sqrt(mean(x^2) + eps), saved for the backward.
  m.def("rms_norm(Tensor x, Tensor weight, float eps, ScalarType? out_dtype=None) "
        "-> (Tensor, Tensor)");
  // The residual add and the norm in one pass: sum = x + residual (x's dtype), out = rms_norm(sum)
  // -> (out, sum, rstd).
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, "
        "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  // Gradients of rms_norm at x (the sum, for add_rms_norm) -> (dx [..., C] in x's dtype, plus
  // grad_res when given: the residual stream's own gradient; dweight [C] in weight's dtype).
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor rstd, "
        "Tensor? grad_res=None) -> (Tensor, Tensor)");
  // Mean cross-entropy of logits [..., V] (raw; soft-capped inside when softcap > 0) against
  // int64 targets [...], skipping targets equal to ignore_index -> (loss 0-d, lse [...]), both
  // fp32 (fp64 for fp64 logits). Chunked over rows: no [rows, V] buffer is made.
  m.def("cross_entropy(Tensor logits, Tensor targets, float softcap=0.0, int ignore_index=-1) "
        "-> (Tensor, Tensor)");
  // Gradient of cross_entropy with respect to the raw logits -> [..., V] in logits' dtype.
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, "
        "float softcap=0.0, int ignore_index=-1) -> Tensor");
  // Causal GQA attention of q [B, Tq, Hq, D] over caches [B, S_max, Hkv, D] holding
  // cache_seqlens[b] valid rows (the Tq new ones included; rows past them are never read).
  // num_splits=0 picks a split-KV count, > 0 forces one (for tests of the split/merge path).
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
        "float scale, float softcap=0.0, int num_splits=0) -> Tensor");
  // Writes k_new/v_new [B, Tn, Hkv, D] into the caches at rows cache_seqlens[b] + t, where
  // cache_seqlens (int32 [B]) holds each sequence's length before the write. The CPU checks
  // 0 <= cache_seqlens[b] and cache_seqlens[b] + Tn <= S_max; CUDA skips rows outside the cache.
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, "
        "Tensor cache_seqlens) -> ()");
  // A Linear weight [out, in] (fp32 or bf16) in the blocked layout of the decode matvec
  // (gptmod/decode_step.h); made once at load.
  m.def("pack_linear(Tensor weight) -> Tensor");
  // A Linear weight [out, in] quantized to int8 in groups of group_size inputs (symmetric, one fp32
  // scale per output and group) -> (packed int8 blocks, scales), the layout of the int8 matvec.
  m.def("pack_linear_int8(Tensor weight, int group_size=64) -> (Tensor, Tensor)");
  // x [N, in] @ W^T -> [N, out_features] in x's dtype, W given as pack_linear(W) (fp32
  // accumulation) or as pack_linear_int8(W) -> (packed, scales) (x quantized the same way per
  // group, exact int32 sums per group, then scaled).
  m.def("linear_packed(Tensor x, Tensor packed, int out_features, Tensor? scales=None) -> Tensor");
  // One cached decode step of a pre-norm RMSNorm/RoPE/GQA/SwiGLU decoder, every layer in one call:
  // x [B, C] token embeddings; norms [2L+1] (ln_1, ln_2 per layer, ln_f); linears [4L+1]
  // (packed c_attn, attn c_proj, c_fc, mlp c_proj per layer, lm_head); kv [L, 2, B, S, Hkv, D]
  // gets each layer's new key/value at row seqlens[b] (int32 [B], left unchanged) -> logits [B, vocab].
  // A linear may be int8 (pack_linear_int8): its scales are then scales[i] (4L + 1 entries; those
  // of float linears are not read).
  m.def("decode_step(Tensor x, Tensor[] norms, Tensor[] linears, Tensor(a!) kv, Tensor seqlens, "
        "Tensor cos, Tensor sin, int n_head, int n_kv_head, int ffn_hidden, int vocab, float eps, "
        "float softcap=0.0, bool interleaved=False, Tensor[]? scales=None) -> Tensor");
  // Whether the bf16 matvec runs on AVX512-BF16 (vdpbf16ps) here; for tests and benchmark reports.
  m.def("cpu_bf16dp() -> bool", &bf16dp_enabled);
  // Whether the int8 matvec runs on AVX512-VNNI (vpdpbusd) here.
  m.def("cpu_vnni() -> bool", &vnni_enabled);
  m.def("cpu_capability() -> str", &cpu_capability);
}

}  // namespace gptmod
