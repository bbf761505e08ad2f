// Grouped matmul on the CPU: C_g = op(A_g) · op(B_g) for G groups of different sizes, in one call.
//
//   grouped_mm(Tensor[] a, Tensor[] b, bool trans_a, bool trans_b) -> Tensor[]
//       op(T) = Tᵀ when the flag is set. Each a_g, b_g is a 2-D tensor of any strides (a transposed view costs no
//       copy); all share one dtype (fp32, fp64, bf16, fp16) and device; the sizes differ freely between groups
//       (ragged rows, columns and inner dimension). Returns new contiguous C_g [rows_g, cols_g]; an empty inner
//       dimension gives zeros.
//
// Work split: every group is cut into blocks of kBlockRows output rows, and the (group, block) tasks run in
// parallel (at::parallel_for / OpenMP), each calling ATen's GEMM (MKL or oneDNN) on its block single-threaded.
// Small groups therefore run side by side instead of one after another, and large ones are split across
// threads. The blocks are fixed (independent of the thread count), so every C_g is bit-identical for any number
// of threads.
#include "common.h"

#include <vector>

namespace saefast {
namespace {

constexpr int64_t kBlockRows = 256;

}  // namespace

std::vector<at::Tensor> grouped_mm_cpu(at::TensorList a, at::TensorList b, bool trans_a, bool trans_b) {
  // Kernels run below autograd: the ATen calls inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "grouped_mm";
  SAEFAST_CHECK(a.size() == b.size(), op, ": a has ", a.size(), " groups but b has ", b.size());
  const int64_t G = static_cast<int64_t>(a.size());
  std::vector<at::Tensor> lhs(G), rhs(G), out(G);
  std::vector<int64_t> first_task(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) {
    SAEFAST_CHECK(a[g].dim() == 2 && b[g].dim() == 2, op, ": group ", g, " needs 2-D a and b; got shapes ",
                  shape_of(a[g]), " and ", shape_of(b[g]));
    check_cpu(a[g], "a");
    check_cpu(b[g], "b");
    SAEFAST_CHECK(a[g].scalar_type() == a[0].scalar_type() && b[g].scalar_type() == a[0].scalar_type(), op,
                  ": every a and b must share one dtype; group ", g, " has ", a[g].scalar_type(), " and ",
                  b[g].scalar_type(), " (group 0: ", a[0].scalar_type(), ")");
    SAEFAST_CHECK(a[g].is_floating_point(), op, ": a and b must be floating point; got ", a[g].scalar_type());
    // Detached: the GEMMs run inside OpenMP threads, where the autograd-exclusion guard does not reach.
    lhs[g] = trans_a ? a[g].detach().t() : a[g].detach();
    rhs[g] = trans_b ? b[g].detach().t() : b[g].detach();
    SAEFAST_CHECK(lhs[g].size(1) == rhs[g].size(0), op, ": group ", g, ": op(a) is ", shape_of(lhs[g]),
                  " but op(b) is ", shape_of(rhs[g]), " (inner dimensions differ)");
    out[g] = new_output({lhs[g].size(0), rhs[g].size(1)}, a[g].options());
    const int64_t blocks = (lhs[g].size(0) + kBlockRows - 1) / kBlockRows;
    first_task[g + 1] = first_task[g] + blocks;
  }
  const int64_t tasks = first_task[G];
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    int64_t g = 0;
    for (int64_t t = t0; t < t1; ++t) {
      while (first_task[g + 1] <= t) ++g;
      const int64_t r0 = (t - first_task[g]) * kBlockRows;
      const int64_t rows = std::min(kBlockRows, lhs[g].size(0) - r0);
      at::Tensor c = out[g].narrow(0, r0, rows);
      if (rhs[g].size(0) == 0) {
        c.zero_();
      } else {
        at::mm_out(c, lhs[g].narrow(0, r0, rows), rhs[g]);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(saefast, CPU, m) { m.impl("grouped_mm", &grouped_mm_cpu); }

}  // namespace saefast
