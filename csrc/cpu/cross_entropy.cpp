// cross_entropy / cross_entropy_backward on CPU: argument checks (targets included), output
// allocation, and a call into the widest CPU build of the kernels
// (csrc/cpu/kernels/cross_entropy_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gptmod/cross_entropy_args.h"
#include "gptmod/elementwise_args.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(cross_entropy_fwd_stub, CrossEntropyFn);
GPTMOD_DEFINE_STUB(cross_entropy_bwd_stub, CrossEntropyFn);

namespace {

// The targets as a contiguous int64 [rows], each checked: in [0, V) or ignore_index.
at::Tensor checked_targets(const char* op, const at::Tensor& targets, int64_t V,
                           int64_t ignore_index) {
  at::Tensor t = targets.contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK((p[i] >= 0 && p[i] < V) || p[i] == ignore_index, op, ": targets must be in [0, ",
                V, ") or ignore_index ", ignore_index, ", got ", p[i], " at ", i);
  }
  return t;
}

CrossEntropyParams ce_params(const at::Tensor& logits, const at::Tensor& rows_view,
                             const at::Tensor& targets, double softcap, int64_t ignore_index) {
  CrossEntropyParams p{};
  p.dtype = logits.scalar_type();
  p.V = logits.size(-1);
  p.rows = logits.numel() / p.V;
  p.softcap = softcap;
  p.ignore_index = ignore_index;
  p.logits = rows_view.const_data_ptr();
  p.targets = targets.const_data_ptr<int64_t>();
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& logits,
                                                     const at::Tensor& targets, double softcap,
                                                     int64_t ignore_index) {
  check_cross_entropy_args("cross_entropy", logits, targets, softcap);
  const auto acc = logits.options().dtype(ce_acc_dtype(logits.scalar_type()));
  at::Tensor lse = at::empty(targets.sizes(), acc);
  const at::Tensor t = checked_targets("cross_entropy", targets, logits.size(-1), ignore_index);
  RowLayout rows;
  const at::Tensor lg = with_row_layout(logits, rows);
  CrossEntropyParams p = ce_params(logits, lg, t, softcap, ignore_index);
  p.logits_rows = rows;
  at::Tensor row_loss = at::empty({p.rows}, acc);
  p.lse = lse.data_ptr();
  p.row_loss = row_loss.data_ptr();
  if (p.rows > 0) cross_entropy_fwd_stub.get()(p);
  // Mean over the counted rows, summed in row order (reproducible); 0 / 0 = nan when every
  // target is ignored, as F.cross_entropy gives.
  const int64_t* tp = t.const_data_ptr<int64_t>();
  double total = 0;
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(row_loss.scalar_type(), "cross_entropy_sum", [&] {
    const scalar_t* l = row_loss.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < p.rows; ++i) {
      if (tp[i] == ignore_index) continue;
      total += double(l[i]);
      ++count;
    }
  });
  at::Tensor loss = at::empty({}, acc).fill_(count ? total / double(count) : NAN);
  return {loss, lse};
}

at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& targets, const at::Tensor& lse,
                                      double softcap, int64_t ignore_index) {
  check_cross_entropy_backward_args(grad_loss, logits, targets, lse, softcap);
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const at::Tensor t = checked_targets("cross_entropy_backward", targets, logits.size(-1),
                                       ignore_index);
  const auto acc = ce_acc_dtype(logits.scalar_type());
  // scale = grad_loss / rows counted: the mean's gradient.
  const at::Tensor scale = grad_loss.to(acc) / t.ne(ignore_index).sum().to(acc);
  RowLayout rows;
  const at::Tensor lg = with_row_layout(logits, rows);
  const at::Tensor l = lse.contiguous();
  CrossEntropyParams p = ce_params(logits, lg, t, softcap, ignore_index);
  p.logits_rows = rows;
  p.lse = const_cast<void*>(l.const_data_ptr());
  p.scale = scale.const_data_ptr();
  p.grad = grad.data_ptr();
  if (p.rows > 0) cross_entropy_bwd_stub.get()(p);
  return grad;
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace gptmod
