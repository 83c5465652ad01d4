// pack_linear / linear_packed / decode_step on CPU: argument checks, output allocation, and the
// choice of kernel build (csrc/cpu/kernels/{matvec,decode_step}_kernel.cpp per capability, the
// AVX512-BF16 matvec in csrc/cpu/bf16/).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "gptmod/decode_step.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(matvec_f32_stub, MatvecFn);
GPTMOD_DEFINE_STUB(matvec_bf16_stub, MatvecFn);
GPTMOD_DEFINE_STUB(decode_step_stub, DecodeStepFn);
MatvecFn matvec_bf16dp_kernel_ptr = nullptr;

bool bf16dp_enabled() {
  static const bool on = [] {
    if (matvec_bf16dp_kernel_ptr == nullptr || cpu::detected_capability() < cpu::kAVX512) return false;
    if (const char* env = std::getenv("GPTMOD_CPU_BF16DP"); env && std::strcmp(env, "0") == 0)
      return false;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
#else
    return false;
#endif
  }();
  return on;
}

MatvecFn pick_matvec(c10::ScalarType dtype) {
  if (dtype == at::kBFloat16) return bf16dp_enabled() ? matvec_bf16dp_kernel_ptr : matvec_bf16_stub.get();
  return matvec_f32_stub.get();
}

namespace {

int64_t blocks(int64_t M) { return (M + kPackBlock - 1) / kPackBlock; }

// The packed shape of a [M, K] weight of `dtype` (gptmod/decode_step.h).
std::vector<int64_t> packed_shape(int64_t M, int64_t K, c10::ScalarType dtype) {
  if (dtype == at::kBFloat16) return {blocks(M), (K + 1) / 2, 2 * kPackBlock};
  return {blocks(M), K, kPackBlock};
}

void check_packed(const char* op, const char* name, const at::Tensor& w, int64_t M, int64_t K,
                  c10::ScalarType dtype) {
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", w.scalar_type());
  TORCH_CHECK(w.is_contiguous() && w.sizes().vec() == packed_shape(M, K, dtype), op, ": ", name,
              " must be a contiguous pack_linear() of a [", M, ", ", K, "] weight, shape ",
              c10::IntArrayRef(packed_shape(M, K, dtype)), ", got ", w.sizes());
}

}  // namespace

at::Tensor pack_linear_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_linear: weight must be 2-D [out, in], got ", weight.dim(), "-D");
  TORCH_CHECK(weight.device().is_cpu(), "pack_linear: weight must be a CPU tensor, got ", weight.device());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16,
              "pack_linear: weight must be float32 or bfloat16, got ", dt);
  const int64_t M = weight.size(0), K = weight.size(1), nb = blocks(M);
  // Zero rows up to a whole block and (bf16) a zero input column up to an even K.
  const int64_t Kp = dt == at::kBFloat16 ? 2 * ((K + 1) / 2) : K;
  at::Tensor w = at::zeros({nb * kPackBlock, Kp}, weight.options());
  w.narrow(0, 0, M).narrow(1, 0, K).copy_(weight);
  if (dt == at::kBFloat16)  // [nb, 16, P, 2] -> [nb, P, 16, 2]
    return w.view({nb, kPackBlock, Kp / 2, 2}).permute({0, 2, 1, 3}).contiguous()
        .view({nb, Kp / 2, 2 * kPackBlock});
  return w.view({nb, kPackBlock, K}).permute({0, 2, 1}).contiguous();
}

at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  const char* op = "linear_packed";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, in], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == packed.scalar_type(), op,
              ": x must be float32 or the packed weight's dtype ", packed.scalar_type(), ", got ",
              x.scalar_type());
  TORCH_CHECK(out_features > 0, op, ": out_features must be positive, got ", out_features);
  check_packed(op, "packed", packed, out_features, x.size(1), packed.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0 && x.size(1) > 0)
    pick_matvec(packed.scalar_type())(MatvecParams{xf.const_data_ptr<float>(), packed.const_data_ptr(),
        y.data_ptr<float>(), x.size(0), x.size(1), out_features, x.size(1), out_features, false});
  else
    y.zero_();
  return y.to(x.scalar_type());
}

at::Tensor decode_step_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList linears,
                           at::Tensor& kv, const at::Tensor& seqlens, const at::Tensor& cos,
                           const at::Tensor& sin, int64_t n_head, int64_t n_kv_head,
                           int64_t ffn_hidden, int64_t vocab, double eps, double softcap,
                           bool interleaved) {
  const char* op = "decode_step";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous CPU tensor [B, C], got ", x.sizes(), " on ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": x must be float32 or bfloat16, got ", dt);
  const int64_t B = x.size(0), C = x.size(1), L = int64_t(linears.size() - 1) / 4;
  TORCH_CHECK(L >= 1 && int64_t(linears.size()) == 4 * L + 1 && int64_t(norms.size()) == 2 * L + 1,
              op, ": expected 4L + 1 linears and 2L + 1 norms, got ", linears.size(), " and ", norms.size());
  TORCH_CHECK(kv.dim() == 6 && kv.size(0) == L && kv.size(1) == 2 && kv.size(2) == B, op,
              ": kv must be [L, 2, B, S, Hkv, D] = [", L, ", 2, ", B, ", ...], got ", kv.sizes());
  TORCH_CHECK(kv.scalar_type() == dt && kv.device().is_cpu(), op, ": kv must be a CPU ", dt, " tensor");
  const int64_t S = kv.size(3), Hkv = kv.size(4), D = kv.size(5);
  TORCH_CHECK(kv.stride(5) == 1 && kv.stride(4) == D && kv.stride(3) == Hkv * D, op,
              ": kv's last three dims [S, Hkv, D] must be contiguous, strides ", kv.strides());
  TORCH_CHECK(n_kv_head == Hkv && n_head > 0 && n_head % Hkv == 0 && D % 2 == 0, op, ": n_head=",
              n_head, " must be a multiple of the cache's Hkv=", Hkv, " = n_kv_head=", n_kv_head,
              ", and D=", D, " even");
  TORCH_CHECK(seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 && seqlens.size(0) == B &&
              seqlens.is_contiguous(), op, ": seqlens must be int32 [", B, "], got ",
              seqlens.scalar_type(), " ", seqlens.sizes());
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(1) == D / 2 &&
                t->is_contiguous(), op, ": cos/sin must be contiguous float32 [max_pos, ", D / 2, "]");
  const int32_t* lens = seqlens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 0 && lens[b] < S && lens[b] < cos.size(0), op, ": row ", b, " has ",
                lens[b], " cached rows: no room for one more (cache ", S, ", RoPE table ",
                cos.size(0), ")");
  const int64_t QD = n_head * D, F = ffn_hidden;
  const int64_t shapes[4][2] = {{QD + 2 * Hkv * D, C}, {C, QD}, {2 * F, C}, {C, F}};
  std::vector<const void*> lin_ptrs, norm_ptrs;
  for (int64_t i = 0; i <= 4 * L; ++i) {
    const int64_t M = i == 4 * L ? vocab : shapes[i % 4][0], K = i == 4 * L ? C : shapes[i % 4][1];
    check_packed(op, "a linear", linears[i], M, K, dt);
    lin_ptrs.push_back(linears[i].const_data_ptr());
  }
  for (const auto& n : norms) {
    TORCH_CHECK(n.scalar_type() == dt && n.dim() == 1 && n.size(0) == C && n.is_contiguous(), op,
                ": every norm weight must be a contiguous ", dt, " [", C, "], got ", n.scalar_type(),
                " ", n.sizes());
    norm_ptrs.push_back(n.const_data_ptr());
  }
  at::Tensor logits = at::empty({B, vocab}, x.options());
  DecodeStepParams p{dt, B, C, n_head, Hkv, D, F, vocab, L, S, float(eps), float(1.0 / std::sqrt(double(D))),
                     float(softcap), interleaved, x.const_data_ptr(), norm_ptrs.data(), lin_ptrs.data(),
                     kv.data_ptr(), {kv.stride(0), kv.stride(1), kv.stride(2)}, lens,
                     cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), logits.data_ptr(),
                     pick_matvec(dt)};
  if (B > 0) decode_step_stub.get()(p);
  return logits;
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("pack_linear", &pack_linear_cpu);
  m.impl("linear_packed", &linear_packed_cpu);
  m.impl("decode_step", &decode_step_cpu);
}

}  // namespace gptmod
