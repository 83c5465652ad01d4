// rope / rope_ on CPU: argument checks, output allocation, and a call into the widest CPU build
// of the kernel (csrc/cpu/kernels/rope_kernel.cpp).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "gptmod/elementwise_args.h"
#include "gptmod/rope.h"

namespace gptmod {

GPTMOD_DEFINE_STUB(rope_stub, RopeFn);

namespace {

// Every position must index a row of cos/sin. Checked here, before the kernel runs, so a bad
// position is a RuntimeError and never an out-of-bounds read.
template <typename index_t>
void check_positions_in_range(const char* op, const at::Tensor& positions, int64_t max_pos) {
  const at::Tensor pos = positions.contiguous();
  const index_t* p = pos.const_data_ptr<index_t>();
  for (int64_t i = 0, n = pos.numel(); i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && int64_t(p[i]) < max_pos, op, ": positions must be in [0, max_pos = ",
                max_pos, "), got ", int64_t(p[i]), " at flat index ", i);
  }
}

void rope_run(const char* op, const at::Tensor& x, const at::Tensor& out, const at::Tensor& cos,
              const at::Tensor& sin, const std::optional<at::Tensor>& positions, bool interleaved,
              bool inverse) {
  if (positions.has_value()) {
    if (positions->scalar_type() == at::kLong) {
      check_positions_in_range<int64_t>(op, *positions, cos.size(0));
    } else {
      check_positions_in_range<int32_t>(op, *positions, cos.size(0));
    }
  }
  if (x.numel() == 0) return;
  // The kernel reads the tables in its accumulation type: fp64 tables for fp64 x (a rare,
  // gradcheck-only path, so the conversion of a float table is not worth a kernel variant).
  const at::ScalarType table_t = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor c = cos.to(table_t), s = sin.to(table_t);
  RopeParams p = rope_params(x, out, c, s, positions, interleaved, inverse);
  rope_stub.get()(p);
}

}  // namespace

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                    const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  check_rope_args("rope", x, cos, sin, positions);
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous whatever x's strides
  rope_run("rope", x, out, cos, sin, positions, interleaved, inverse);
  return out;
}

void rope_inplace_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& positions, bool interleaved, bool inverse) {
  check_rope_args("rope_", x, cos, sin, positions);
  // Writing through a view whose elements share memory (an expand) would race.
  at::assert_no_internal_overlap(x);
  rope_run("rope_", x, x, cos, sin, positions, interleaved, inverse);
}

TORCH_LIBRARY_IMPL(gptmod, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_", &rope_inplace_cpu);
}

}  // namespace gptmod
