// pack_linear / pack_linear_int8 / linear_packed / decode_step on CPU: argument checks, output
// allocation, the int8 quantization of weights at load, and the choice of kernel build
// (csrc/cpu/kernels/{matvec,decode_step}_kernel.cpp per capability, the AVX512-BF16 matvec in
// csrc/cpu/bf16/, the AVX512-VNNI one in csrc/cpu/vnni/).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "gptmod/decode_step.h"
#include "gptmod/quant.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(matvec_f32_stub, MatvecFn);
GPTMOD_DEFINE_STUB(matvec_bf16_stub, MatvecFn);
GPTMOD_DEFINE_STUB(matvec_int8_stub, MatvecFn);
GPTMOD_DEFINE_STUB(decode_step_stub, DecodeStepFn);
MatvecFn matvec_bf16dp_kernel_ptr = nullptr;
MatvecInt8Fn matvec_int8_vnni_kernel_ptr = nullptr;

namespace {

#if defined(__x86_64__) || defined(_M_X64)
#define GPTMOD_CPU_HAS(feature) (__builtin_cpu_init(), __builtin_cpu_supports(feature) != 0)
#else
#define GPTMOD_CPU_HAS(feature) false
#endif

// Whether a separately built AVX-512 extension kernel may run: it was built (`ptr`), the chosen
// capability is AVX512, cpuid reports the extension, and the environment switch `env` is not "0".
bool extension_enabled(const void* ptr, const char* env, bool cpu_has) {
  if (ptr == nullptr || cpu::detected_capability() < cpu::kAVX512 || !cpu_has) return false;
  const char* v = std::getenv(env);
  return !(v && std::strcmp(v, "0") == 0);
}

}  // namespace

bool bf16dp_enabled() {
  static const bool on = extension_enabled(reinterpret_cast<const void*>(matvec_bf16dp_kernel_ptr),
                                           "GPTMOD_CPU_BF16DP", GPTMOD_CPU_HAS("avx512bf16"));
  return on;
}

bool vnni_enabled() {
  static const bool on = extension_enabled(reinterpret_cast<const void*>(matvec_int8_vnni_kernel_ptr),
                                           "GPTMOD_CPU_VNNI", GPTMOD_CPU_HAS("avx512vnni"));
  return on;
}

MatvecFn pick_matvec(c10::ScalarType dtype) {
  if (dtype == at::kChar) return matvec_int8_stub.get();
  if (dtype == at::kBFloat16) return bf16dp_enabled() ? matvec_bf16dp_kernel_ptr : matvec_bf16_stub.get();
  return matvec_f32_stub.get();
}

namespace {

int64_t blocks(int64_t M) { return (M + kPackBlock - 1) / kPackBlock; }
int64_t round_up(int64_t K, int64_t G) { return (K + G - 1) / G * G; }

// The packed shape of a [M, K] weight of `dtype` (gptmod/decode_step.h); G: int8's group size.
std::vector<int64_t> packed_shape(int64_t M, int64_t K, c10::ScalarType dtype, int64_t G = 0) {
  if (dtype == at::kChar) return {blocks(M), round_up(K, G) / kInt8Quad, kInt8Quad * kPackBlock};
  if (dtype == at::kBFloat16) return {blocks(M), (K + 1) / 2, 2 * kPackBlock};
  return {blocks(M), K, kPackBlock};
}

void check_group_size(const char* op, int64_t G) {
  TORCH_CHECK(G > 0 && G % kInt8Quad == 0 && G <= kMaxQuantGroup, op,
              ": group_size must be a positive multiple of 4 and at most ", kMaxQuantGroup, ", got ", G);
}

// The group size of an int8 pack of a [M, K] weight, from its scales [ceil(M/16), Kp/G, 16].
int64_t int8_group(const char* op, const char* name, const at::Tensor& packed, const at::Tensor& scales,
                   int64_t M, int64_t K) {
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 3 &&
              scales.is_contiguous() && scales.size(0) == blocks(M) && scales.size(1) > 0 &&
              scales.size(2) == kPackBlock, op, ": the scales of ", name, " must be the contiguous float32 "
              "CPU scales [", blocks(M), ", groups, ", kPackBlock, "] of pack_linear_int8, got ",
              scales.scalar_type(), " ", scales.sizes(), " on ", scales.device());
  const int64_t groups = scales.size(1), P = packed.dim() == 3 ? packed.size(1) : 0;
  const int64_t G = P * kInt8Quad / groups;
  TORCH_CHECK(G > 0 && G * groups == P * kInt8Quad && G % kInt8Quad == 0 && round_up(K, G) == G * groups,
              op, ": ", name, " ", packed.sizes(), " and its scales ", scales.sizes(),
              " are not a pack_linear_int8() of a [", M, ", ", K, "] weight");
  return G;
}

void check_packed(const char* op, const char* name, const at::Tensor& w, int64_t M, int64_t K,
                  c10::ScalarType dtype, int64_t G = 0) {
  TORCH_CHECK(w.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", w.device());
  TORCH_CHECK(w.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", w.scalar_type());
  const auto want = packed_shape(M, K, dtype, G);
  TORCH_CHECK(w.is_contiguous() && w.sizes().vec() == want, op, ": ", name,
              " must be a contiguous ", dtype == at::kChar ? "pack_linear_int8()" : "pack_linear()",
              " of a [", M, ", ", K, "] weight, shape ", c10::IntArrayRef(want), ", got ", w.sizes());
}

// The matvec's view of a packed weight: its data, scales and group (int8), and kernel.
PackedLinear packed_linear(const char* op, const char* name, const at::Tensor& w,
                           const at::Tensor* scales, int64_t M, int64_t K, c10::ScalarType float_dtype) {
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(scales != nullptr && scales->defined(), op, ": ", name,
                " is int8 (pack_linear_int8) but no scales were given");
    const int64_t G = int8_group(op, name, w, *scales, M, K);
    check_packed(op, name, w, M, K, at::kChar, G);
    return {w.const_data_ptr(), scales->const_data_ptr<float>(), G, pick_matvec(at::kChar)};
  }
  check_packed(op, name, w, M, K, float_dtype);
  return {w.const_data_ptr(), nullptr, 0, pick_matvec(float_dtype)};
}

void run_matvec(const PackedLinear& lin, const float* x, float* y, int64_t N, int64_t K, int64_t M,
                bool accumulate) {
  lin.matvec(MatvecParams{x, lin.w, y, N, K, M, K, M, accumulate, lin.scales, lin.group});
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

std::tuple<at::Tensor, at::Tensor> pack_linear_int8_cpu(const at::Tensor& weight, int64_t group_size) {
  const char* op = "pack_linear_int8";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", weight.dim(), "-D");
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight.device());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": weight must be float32, bfloat16 or float16, got ", dt);
  check_group_size(op, group_size);
  const int64_t M = weight.size(0), K = weight.size(1), G = group_size, nb = blocks(M);
  const int64_t Kp = round_up(K, G), ng = Kp / G;
  // Rows quantized group by group into [nb * 16, Kp] int8 and [nb * 16, ng] scales (rows past M
  // and inputs past K stay zero), then laid out as gptmod/decode_step.h says.
  const at::Tensor wf = weight.to(at::kFloat).contiguous();
  at::Tensor q = at::zeros({nb * kPackBlock, Kp}, weight.options().dtype(at::kChar));
  at::Tensor s = at::zeros({nb * kPackBlock, ng}, weight.options().dtype(at::kFloat));
  const float* src = wf.const_data_ptr<float>();
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = s.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < ng; ++g)
        sd[m * ng + g] = quantize_group(src + m * K + g * G, std::min(G, K - g * G), G, qd + m * Kp + g * G);
  });
  at::Tensor packed = q.view({nb, kPackBlock, Kp / kInt8Quad, kInt8Quad}).permute({0, 2, 1, 3})
                          .contiguous().view({nb, Kp / kInt8Quad, kInt8Quad * kPackBlock});
  at::Tensor scales = s.view({nb, kPackBlock, ng}).permute({0, 2, 1}).contiguous();
  return {packed, scales};
}

at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                             const std::optional<at::Tensor>& scales) {
  const char* op = "linear_packed";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, in], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  const bool int8 = packed.scalar_type() == at::kChar;
  const auto x_alt = int8 ? at::kBFloat16 : packed.scalar_type();  // besides float32
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == x_alt, op, ": x must be float32 or ",
              int8 ? "bfloat16 with int8 weights" : "the packed weight's dtype", " ", x_alt, ", got ",
              x.scalar_type());
  TORCH_CHECK(out_features > 0, op, ": out_features must be positive, got ", out_features);
  TORCH_CHECK(int8 || !scales.has_value(), op, ": scales are for int8 weights (pack_linear_int8), but packed is ",
              packed.scalar_type());
  const PackedLinear lin = packed_linear(op, "packed", packed, scales.has_value() ? &*scales : nullptr,
                                         out_features, x.size(1), packed.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), out_features}, x.options().dtype(at::kFloat));
  if (x.size(0) > 0 && x.size(1) > 0)
    run_matvec(lin, xf.const_data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), out_features, false);
  else
    y.zero_();
  return y.to(x.scalar_type());
}

at::Tensor decode_step_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList linears,
                           at::Tensor& kv, const at::Tensor& seqlens, const at::Tensor& cos,
                           const at::Tensor& sin, int64_t n_head, int64_t n_kv_head,
                           int64_t ffn_hidden, int64_t vocab, double eps, double softcap,
                           bool interleaved, std::optional<at::TensorList> scales) {
  const char* op = "decode_step";
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), op,
              ": x must be a contiguous CPU tensor [B, C], got ", x.sizes(), " on ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": x must be float32 or bfloat16, got ", dt);
  const int64_t B = x.size(0), C = x.size(1), L = int64_t(linears.size() - 1) / 4;
  TORCH_CHECK(L >= 1 && int64_t(linears.size()) == 4 * L + 1 && int64_t(norms.size()) == 2 * L + 1,
              op, ": expected 4L + 1 linears and 2L + 1 norms, got ", linears.size(), " and ", norms.size());
  TORCH_CHECK(!scales.has_value() || scales->size() == linears.size(), op, ": scales must hold one "
              "tensor per linear (4L + 1 = ", linears.size(), "), got ", scales.has_value() ? scales->size() : 0);
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
  std::vector<PackedLinear> lins;
  for (int64_t i = 0; i <= 4 * L; ++i) {
    const int64_t M = i == 4 * L ? vocab : shapes[i % 4][0], K = i == 4 * L ? C : shapes[i % 4][1];
    const at::Tensor* s = scales.has_value() ? &(*scales)[i] : nullptr;
    lins.push_back(packed_linear(op, "a linear", linears[i], s, M, K, dt));
  }
  std::vector<const void*> norm_ptrs;
  for (const auto& n : norms) {
    TORCH_CHECK(n.scalar_type() == dt && n.dim() == 1 && n.size(0) == C && n.is_contiguous(), op,
                ": every norm weight must be a contiguous ", dt, " [", C, "], got ", n.scalar_type(),
                " ", n.sizes());
    norm_ptrs.push_back(n.const_data_ptr());
  }
  at::Tensor logits = at::empty({B, vocab}, x.options());
  DecodeStepParams p{dt, B, C, n_head, Hkv, D, F, vocab, L, S, float(eps), float(1.0 / std::sqrt(double(D))),
                     float(softcap), interleaved, x.const_data_ptr(), norm_ptrs.data(), lins.data(),
                     kv.data_ptr(), {kv.stride(0), kv.stride(1), kv.stride(2)}, lens,
                     cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), logits.data_ptr()};
  if (B > 0) decode_step_stub.get()(p);
  return logits;
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("pack_linear", &pack_linear_cpu);
  m.impl("pack_linear_int8", &pack_linear_int8_cpu);
  m.impl("linear_packed", &linear_packed_cpu);
  m.impl("decode_step", &decode_step_cpu);
}

}  // namespace gptmod
