// The decoder-norm gradient projection on the CPU, in one pass per row (OpenMP through at::parallel_for):
//
//   grad[r, :] ← grad[r, :] − (grad[r, :]·W[r, :] / max(‖W[r, :]‖, 1e-12)²) · W[r, :]
//
// the contract of kernels/saefast_triton/decoder_grad_projection.py (oracle: saefast.ref.remove_parallel_grad_). In
// place on grad (rows of unit stride with one row stride: a contiguous tensor or a member slice of one); W is only
// read. Sums in fp32 over 16 fixed lanes, so the result is the same for any thread count. Eager PyTorch makes three [R,
// D] temporaries and ~9 passes; this reads each row of W and grad once into cache, then updates grad from it.
#include "common.h"

namespace saefast {
namespace {

template <typename TW, typename TG>
void project_rows(const TW* W, int64_t stride_w, TG* G, int64_t stride_g, int64_t R, int64_t D) {
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {
    constexpr int64_t L = 16;
    for (int64_t r = r0; r < r1; ++r) {
      const TW* w = W + r * stride_w;
      TG* g = G + r * stride_g;
      float ww[L] = {0}, gw[L] = {0};
      int64_t d = 0;
      for (; d + L <= D; d += L)
        for (int64_t l = 0; l < L; ++l) {
          const float wv = to_float(w[d + l]);
          ww[l] += wv * wv;
          gw[l] += to_float(g[d + l]) * wv;
        }
      for (int64_t l = 0; d < D; ++d, ++l) {
        const float wv = to_float(w[d]);
        ww[l] += wv * wv;
        gw[l] += to_float(g[d]) * wv;
      }
      float norm_sq = 0.0f, dot = 0.0f;
      for (int64_t l = 0; l < L; ++l) {
        norm_sq += ww[l];
        dot += gw[l];
      }
      const float norm = std::max(std::sqrt(norm_sq), 1e-12f);
      const float coef = dot / (norm * norm);
      for (int64_t e = 0; e < D; ++e) g[e] = from_float<TG>(to_float(g[e]) - coef * to_float(w[e]));
    }
  });
}

void remove_parallel_grad_cpu(const at::Tensor& W, const at::Tensor& grad) {
  const char* op = "native_remove_parallel_grad_";
  check_cpu(W, "W");
  check_cpu(grad, "grad");
  SAEFAST_CHECK(W.dim() >= 1 && W.sizes() == grad.sizes(), op, ": W and grad must have one shape [..., D]; got ",
                shape_of(W), " and ", shape_of(grad));
  SAEFAST_CHECK(is_float_dtype(W.scalar_type()) && is_float_dtype(grad.scalar_type()), op,
                ": W and grad must be float32, bfloat16 or float16; got ", W.scalar_type(), " and ",
                grad.scalar_type());
  const int64_t D = W.size(-1);
  if (D == 0 || W.numel() == 0) return;
  const int64_t R = W.numel() / D;
  // grad is updated through a [R, D] view: it must have one (view throws otherwise, caught as ValueError below)
  at::Tensor rows_g;
  try {
    rows_g = grad.view({R, D});
  } catch (const c10::Error&) {
    SAEFAST_CHECK(false, op, ": grad must be viewable as [rows, D] to be updated in place; got strides ",
                  c10::str(grad.strides()), " for shape ", shape_of(grad));
  }
  SAEFAST_CHECK(rows_g.stride(1) == 1, op, ": grad's last dimension must have unit stride; got strides ",
                c10::str(grad.strides()));
  at::Tensor rows_w = W.reshape({R, D});
  if (rows_w.stride(1) != 1) rows_w = rows_w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "native_remove_parallel_grad_", [&] {
    using TW = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "native_remove_parallel_grad_", [&] {
      project_rows<TW, scalar_t>(rows_w.data_ptr<TW>(), rows_w.stride(0), rows_g.data_ptr<scalar_t>(),
                                 rows_g.stride(0), R, D);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(saefast, CPU, m) { m.impl("native_remove_parallel_grad_", &remove_parallel_grad_cpu); }

}  // namespace saefast
