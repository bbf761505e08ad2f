// One fused Adam step on the CPU, in one pass over each parameter (OpenMP through at::parallel_for):
//
//   m ← m + (1 − β1)·(g − m)                       (torch's lerp_(g, 1 − β1))
//   v ← β2·v + (1 − β2)·g²
//   p ← p − (lr / bc1)·m / (√v / √bc2 + ε)          bc1 = 1 − β1^t, bc2 = 1 − β2^t (given, computed in double)
//
// torch.optim.Adam's single-tensor update (amsgrad, weight decay and maximize off), the contract of
// kernels/saefast_triton/adam_step.py (oracle: saefast.ops.ref.adam_step_). With unit_rows, the tensors are rows
// [R, D] and each row, in the same pass, first has its gradient projected off the row
// (g ← g − (g·w / max(‖w‖, 1e-12)²)·w, written back to grad: saefast.ops.ref.remove_parallel_grad_), then takes
// the Adam step, then is renormalised (w ← w / max(‖w‖, 1e-12): saefast.ops.ref.normalize_rows_). A row of D ≤ a few
// thousand fp32 stays in L1/L2 between its three sweeps, so memory sees each of p, g, m, v read once and written
// once. In place on all four tensors (fp32, contiguous: a whole parameter or a member slice of one).
//
// Rows (unit_rows) or fixed blocks of elements are split over threads in fixed partitions, and row sums use 16 fixed
// lanes: the result is bit-identical for any thread count.
#include <cmath>

#include "common.h"

namespace saefast {
namespace {

// The scalars of one step, in fp32 as torch's CPU kernels use them (computed from doubles once, on the host).
struct AdamScalars {
  float lerp_coeff, lerp_small;  // torch's lerp: weight < 0.5 → m + w·(g − m); else g − (g − m)·(1 − w)
  float beta2, one_minus_beta2;
  float bc2_sqrt, eps, neg_step_size;
};

AdamScalars make_scalars(double lr, double beta1, double beta2, double eps, double bc1, double bc2) {
  const double weight = 1.0 - beta1;
  AdamScalars s;
  s.lerp_small = std::abs(weight) < 0.5 ? 1.0f : 0.0f;
  s.lerp_coeff = static_cast<float>(weight);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  return s;
}

// The elementwise Adam update of n contiguous elements, in torch's op order (lerp, then mul + addcmul, then
// sqrt / √bc2 + ε, then addcdiv). Branch-free inner loop: it vectorises.
template <bool SmallWeight>
inline void adam_span_impl(float* __restrict p, const float* __restrict g, float* __restrict m,
                           float* __restrict v, int64_t n, const AdamScalars& s) {
  // torch's lerp: m + w·(g − m) for w < 0.5, else g − (g − m)·(1 − w)
  // (the build's -fno-math-errno lets the square root vectorise)
  const float w = s.lerp_coeff, one_minus_w = 1.0f - s.lerp_coeff;
  const float beta2 = s.beta2, one_minus_beta2 = s.one_minus_beta2, bc2_sqrt = s.bc2_sqrt, eps = s.eps;
  const float neg_step_size = s.neg_step_size;
  for (int64_t e = 0; e < n; ++e) {
    const float ge = g[e];
    const float me = SmallWeight ? m[e] + w * (ge - m[e]) : ge - (ge - m[e]) * one_minus_w;
    const float ve = v[e] * beta2 + one_minus_beta2 * ge * ge;
    m[e] = me;
    v[e] = ve;
    p[e] = p[e] + neg_step_size * me / (std::sqrt(ve) / bc2_sqrt + eps);
  }
}

inline void adam_span(float* p, const float* g, float* m, float* v, int64_t n, const AdamScalars& s) {
  if (s.lerp_small != 0.0f)
    adam_span_impl<true>(p, g, m, v, n, s);
  else
    adam_span_impl<false>(p, g, m, v, n, s);
}

// Σ_d a[d]·b[d] in 16 fixed lanes (vectorised, the same for any thread count).
inline float lanes_dot(const float* __restrict a, const float* __restrict b, int64_t D) {
  constexpr int64_t L = 16;
  float lanes[L] = {0};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] += a[d + l] * b[d + l];
  for (int64_t l = 0; d < D; ++d, ++l) lanes[l] += a[d] * b[d];
  float sum = 0.0f;
  for (int64_t l = 0; l < L; ++l) sum += lanes[l];
  return sum;
}

void adam_rows(float* P, float* G, float* Mo, float* V, int64_t R, int64_t D, const AdamScalars& s) {
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* p = P + r * D;
      float* g = G + r * D;
      // 1. the projection g ← g − (g·ŵ)ŵ, ŵ = w / max(‖w‖, 1e-12)
      const float norm = std::max(std::sqrt(lanes_dot(p, p, D)), 1e-12f);
      const float coef = lanes_dot(g, p, D) / (norm * norm);
      for (int64_t e = 0; e < D; ++e) g[e] = g[e] - coef * p[e];
      // 2. Adam on the row (from cache)
      adam_span(p, g, Mo + r * D, V + r * D, D, s);
      // 3. back to unit norm: w ← w / max(‖w‖, 1e-12)
      const float new_norm = std::max(std::sqrt(lanes_dot(p, p, D)), 1e-12f);
      for (int64_t e = 0; e < D; ++e) p[e] = p[e] / new_norm;
    }
  });
}

// Fixed element blocks of the unit_rows=False step (any partition gives the same bits: each element is
// independent; the grain only sets the work per task).
constexpr int64_t kElementGrain = 16384;

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                   double bias_correction1, double bias_correction2, bool unit_rows) {
  const char* op = "native_adam_step_";
  const std::pair<const at::Tensor*, const char*> tensors[] = {
      {&param, "param"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [t, name] : tensors) {
    check_cpu(*t, name);
    SAEFAST_CHECK(t->sizes() == param.sizes(), op, ": param, grad, exp_avg and exp_avg_sq must have one shape; got ",
                  name, " ", shape_of(*t), " for param ", shape_of(param));
    SAEFAST_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32 (fp32 master weights and "
                  "moments); got ", t->scalar_type());
    SAEFAST_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous (a whole parameter or a member slice "
                  "of one); got strides ", c10::str(t->strides()), " for shape ", shape_of(*t));
  }
  SAEFAST_CHECK(!unit_rows || param.dim() >= 1, op, ": unit_rows needs rows [..., D]; got a 0-d tensor");
  SAEFAST_CHECK(bias_correction1 > 0.0 && bias_correction2 > 0.0, op,
                ": bias corrections 1 − β^step must be positive (step ≥ 1, 0 ≤ β < 1); got ", bias_correction1,
                " and ", bias_correction2);
  const int64_t n = param.numel();
  if (n == 0) return;
  const AdamScalars s = make_scalars(lr, beta1, beta2, eps, bias_correction1, bias_correction2);
  float* P = param.data_ptr<float>();
  float* G = grad.data_ptr<float>();
  float* Mo = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
  if (unit_rows) {
    const int64_t D = param.size(-1);
    adam_rows(P, G, Mo, V, n / D, D, s);
    return;
  }
  at::parallel_for(0, n, kElementGrain, [&](int64_t e0, int64_t e1) {
    adam_span(P + e0, G + e0, Mo + e0, V + e0, e1 - e0, s);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(saefast, CPU, m) { m.impl("native_adam_step_", &adam_step_cpu); }

}  // namespace saefast
