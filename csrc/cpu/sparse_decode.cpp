// Sparse ensemble decode and its backward on the CPU (OpenMP through at::parallel_for).
//
// Same contracts as the Triton kernels (kernels/saefast_triton/sparse_decode.py,
// kernels/saefast_triton/sparse_decode_backward.py):
//
//   native_sparse_decode, per_member=False:  out[n]    = bias    + Σ_j α_j Σ_k mask·v[n,j,k]·W[j, idx[n,j,k]]   [N, D]
//                         per_member=True:   out[n,j]  = bias[j] +     α_j Σ_k mask·v[n,j,k]·W[j, idx[n,j,k]]   [N, J, D]
//   native_sparse_decode_grad_values:        dv[n,j,k] = α_j·mask·⟨g[n] (or g[n,j]), W[j, idx[n,j,k]]⟩          [N, J, K] fp32
//   native_sparse_decode_grad_weight:        dW[j,m]   = α_j Σ_{idx[n,j,k]=m} mask·v[n,j,k]·g[n] (or g[n,j])     [J, M, D] fp32
//   native_sparse_decode_backward:           (dv, dW) of the two above in one latent-ordered pass (the training path:
//                                            each decoder row is read once, sequentially, instead of once per slot)
//
// No dense [N, J·M] code exists anywhere: the work is O(N·J·K·D). Products and sums are fp32; W_dec, bias and the
// decode output are fp32, bf16 or fp16 (the output in W_dec's dtype). A masked-out slot is never read.
//
// Determinism: the forward and grad_values give each output row to one task, which sums its slots in (j, k)
// order; grad_weight first buckets the slots by latent (a stable counting sort per member, in (n, k) order),
// then gives each decoder row to one task. Every result is therefore bit-identical for any thread count, and
// `deterministic` changes nothing here (it selects between two CUDA kernels).
#include "common.h"

#include <vector>

namespace saefast {
namespace {

struct SlotArgs {
  int64_t N, J, K, M, D;
};

// Validates the common arguments; returns contiguous fp32 values (when given) and the sizes.
SlotArgs check_slots(const char* op, const at::Tensor* values, const at::Tensor& indices, const at::Tensor& W,
                     const at::Tensor& alpha, const c10::optional<at::Tensor>& mask) {
  SAEFAST_CHECK(indices.dim() == 3, op, ": indices must be [N, J, K]; got shape ", shape_of(indices));
  SAEFAST_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64; got ", indices.scalar_type());
  SAEFAST_CHECK(W.dim() == 3, op, ": W_dec must be [J, M, D]; got shape ", shape_of(W));
  SAEFAST_CHECK(is_float_dtype(W.scalar_type()), op, ": W_dec must be float32, bfloat16 or float16; got ",
                W.scalar_type());
  SAEFAST_CHECK(W.is_contiguous(), op, ": W_dec must be contiguous (each slot reads one row of D)");
  const int64_t N = indices.size(0), J = indices.size(1), K = indices.size(2);
  SAEFAST_CHECK(W.size(0) == J, op, ": indices have J = ", J, " members but W_dec has ", W.size(0));
  SAEFAST_CHECK(W.size(1) >= 1, op, ": W_dec needs M >= 1 latents; got shape ", shape_of(W));
  check_cpu(indices, "indices");
  check_cpu(W, "W_dec");
  check_cpu(alpha, "alpha");
  SAEFAST_CHECK(alpha.dim() == 1 && alpha.size(0) == J, op, ": alpha must be [J] = [", J, "]; got shape ",
                shape_of(alpha));
  SAEFAST_CHECK(alpha.is_floating_point(), op, ": alpha must be a float tensor; got ", alpha.scalar_type());
  if (values != nullptr) {
    SAEFAST_CHECK(values->sizes() == indices.sizes(), op, ": values ", shape_of(*values), " and indices ",
                  shape_of(indices), " differ in shape");
    SAEFAST_CHECK(is_float_dtype(values->scalar_type()), op, ": values must be float32, bfloat16 or float16; got ",
                  values->scalar_type());
    check_cpu(*values, "values");
  }
  if (mask.has_value()) {
    SAEFAST_CHECK(mask->sizes() == indices.sizes(), op, ": mask must be [N, J, K] = ", shape_of(indices), "; got ",
                  shape_of(*mask));
    SAEFAST_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool; got ", mask->scalar_type());
    check_cpu(*mask, "mask");
  }
  const int64_t M = W.size(1);
  // Out-of-range latents are an error before any compute (a masked-out slot's index is never read).
  if (indices.numel() > 0) {
    at::Tensor live = mask.has_value() ? indices.masked_select(*mask) : indices;
    if (live.numel() > 0) {
      auto [lo, hi] = at::aminmax(live);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      SAEFAST_CHECK(lo_v >= 0 && hi_v < M, op, ": indices must lie in [0, M = ", M, "); got values in [", lo_v,
                    ", ", hi_v, "]");
    }
  }
  return {N, J, K, M, W.size(2)};
}

// [N, D] (combined) or [N, J, D] (per member) gradient → (D, per_member).
std::pair<int64_t, bool> check_grad_out(const char* op, const at::Tensor& g, int64_t N, int64_t J, int64_t D) {
  check_cpu(g, "grad_out");
  SAEFAST_CHECK(g.scalar_type() == at::kFloat, op, ": grad_out must be float32; got ", g.scalar_type());
  if (g.dim() == 2) {
    SAEFAST_CHECK(g.size(0) == N && g.size(1) == D, op, ": grad_out must be [N, D] = [", N, ", ", D, "] or [N, J, D]; got ",
                  shape_of(g));
    return {D, false};
  }
  SAEFAST_CHECK(g.dim() == 3 && g.size(0) == N && g.size(1) == J && g.size(2) == D, op,
                ": grad_out must be [N, D] or [N, J, D] = [", N, ", ", J, ", ", D, "]; got ", shape_of(g));
  return {D, true};
}

template <typename w_t>
void decode_rows(const float* v, const int64_t* idx, const bool* mask, const w_t* W, const float* alpha,
                 const float* bias, int64_t bias_stride_j, bool per_member, w_t* out, const SlotArgs& s) {
  const int64_t J = s.J, K = s.K, M = s.M, D = s.D;
  at::parallel_for(0, s.N, kRowGrain, [&](int64_t n0, int64_t n1) {
    std::vector<float> acc(D);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t j = 0; j < J; ++j) {
        if (per_member || j == 0) {
          if (bias != nullptr) {
            const float* b = bias + (per_member ? j * bias_stride_j : 0);
            for (int64_t d = 0; d < D; ++d) acc[d] = b[d];
          } else {
            std::fill(acc.begin(), acc.end(), 0.0f);
          }
        }
        const int64_t slot0 = (n * J + j) * K;
        for (int64_t k = 0; k < K; ++k) {
          prefetch_slot(W, idx, slot0, j, k, J, K, M, D);
          if (mask != nullptr && !mask[slot0 + k]) continue;
          axpy_row(acc.data(), alpha[j] * v[slot0 + k], W + (j * M + idx[slot0 + k]) * D, D);
        }
        if (per_member || j == J - 1) {
          w_t* o = out + (per_member ? (n * J + j) * D : n * D);
          for (int64_t d = 0; d < D; ++d) o[d] = from_float<w_t>(acc[d]);
        }
      }
      if (J == 0 && !per_member) {  // no member: the bias alone
        w_t* o = out + n * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<w_t>(bias != nullptr ? bias[d] : 0.0f);
      }
    }
  });
}

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                             const at::Tensor& alpha, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& mask, bool per_member) {
  // Kernels run below autograd: the ATen calls inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "native_sparse_decode";
  const SlotArgs s = check_slots(op, &values, indices, W_dec, alpha, mask);
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    SAEFAST_CHECK(is_float_dtype(bias->scalar_type()), op, ": bias must be float32, bfloat16 or float16; got ",
                  bias->scalar_type());
    if (per_member) {
      SAEFAST_CHECK(bias->dim() == 2 && bias->size(0) == s.J && bias->size(1) == s.D, op,
                    ": per-member bias must be [J, D] = [", s.J, ", ", s.D, "]; got ", shape_of(*bias));
    } else {
      SAEFAST_CHECK(bias->dim() == 1 && bias->size(0) == s.D, op, ": bias must be [D] = [", s.D, "]; got ",
                    shape_of(*bias));
    }
    bias_f = bias->to(at::kFloat).contiguous();
  }
  auto out_shape = per_member ? std::vector<int64_t>{s.N, s.J, s.D} : std::vector<int64_t>{s.N, s.D};
  at::Tensor out = new_output(out_shape, W_dec.options());
  if (s.N == 0 || s.D == 0) return out;
  const at::Tensor v = values.to(at::kFloat).contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "native_sparse_decode", [&] {
    decode_rows<scalar_t>(v.data_ptr<float>(), idx.data_ptr<int64_t>(), m.defined() ? m.data_ptr<bool>() : nullptr,
                          W_dec.data_ptr<scalar_t>(), a.data_ptr<float>(),
                          bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, s.D, per_member,
                          out.data_ptr<scalar_t>(), s);
  });
  return out;
}

at::Tensor sparse_decode_grad_values_cpu(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& W_dec,
                                         const at::Tensor& alpha, const c10::optional<at::Tensor>& mask) {
  // Kernels run below autograd: the ATen calls inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "native_sparse_decode_grad_values";
  const SlotArgs s = check_slots(op, nullptr, indices, W_dec, alpha, mask);
  const bool per_member = check_grad_out(op, grad_out, s.N, s.J, s.D).second;
  at::Tensor dv = new_output({s.N, s.J, s.K}, indices.options().dtype(at::kFloat));
  if (dv.numel() == 0) return dv;
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const float* gp = g.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const float* ap = a.data_ptr<float>();
  float* out = dv.data_ptr<float>();
  const int64_t J = s.J, K = s.K, M = s.M, D = s.D;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "native_sparse_decode_grad_values",
                                  [&] {
    const scalar_t* W = W_dec.data_ptr<scalar_t>();
    at::parallel_for(0, s.N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t j = 0; j < J; ++j) {
          const float* gr = gp + (per_member ? (n * J + j) * D : n * D);
          const int64_t slot0 = (n * J + j) * K;
          for (int64_t k = 0; k < K; ++k) {
            prefetch_slot(W, ip, slot0, j, k, J, K, M, D);
            if (mp != nullptr && !mp[slot0 + k]) {
              out[slot0 + k] = 0.0f;
              continue;
            }
            out[slot0 + k] = ap[j] * dot_row(gr, W + (j * M + ip[slot0 + k]) * D, D);
          }
        }
      }
    });
  });
  return dv;
}

namespace {

// The latent-ordered backward: bucket the live slots of each member by latent (row_ptr [J, M + 1] into slot ids
// n·K + k, a stable counting sort in (n, k) order), then give each decoder row (j, m) to one task, which sums
//     dW[j, m] = α_j Σ_{slots of m} v·g[n]        and, when W is given, writes for the same slots
//     dv[n, j, k] = α_j ⟨g[n], W[j, m]⟩         (W's row read once, sequentially, instead of one gather per slot).
template <typename w_t>
void bucketed_backward(const float* gp, bool per_member, const float* vp, const int64_t* ip, const bool* mp,
                       const float* ap, const w_t* W, float* dv, float* dWp, int64_t N, int64_t J, int64_t K, int64_t M,
                       int64_t D) {
  const LatentBuckets buckets =
      bucket_by_latent(ip, N, J, K, M, [&](int64_t slot) { return mp == nullptr || mp[slot]; });
  at::parallel_for(0, J * M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j = r / M, m = r % M;
      const int64_t* rp = buckets.rows(j, M);
      const int64_t* bucket = buckets.bucket(j);
      const w_t* w_row = W == nullptr ? nullptr : W + r * D;
      float* acc = dWp + r * D;
      for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
      for (int64_t e = rp[m]; e < rp[m + 1]; ++e) {
        const int64_t n = bucket[e] / K, k = bucket[e] % K;
        const int64_t slot = (n * J + j) * K + k;
        const float* gr = gp + (per_member ? (n * J + j) * D : n * D);
        if (w_row != nullptr) dv[slot] = ap[j] * dot_row(gr, w_row, D);
        axpy_row(acc, vp[slot], gr, D);
      }
      for (int64_t d = 0; d < D; ++d) acc[d] *= ap[j];
    }
  });
}

}  // namespace

at::Tensor sparse_decode_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
                                         int64_t n_latents, const at::Tensor& alpha,
                                         const c10::optional<at::Tensor>& mask, bool deterministic) {
  (void)deterministic;  // always deterministic on the CPU (see the file comment)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "native_sparse_decode_grad_weight";
  SAEFAST_CHECK(n_latents >= 1, op, ": n_latents must be >= 1; got ", n_latents);
  SAEFAST_CHECK(grad_out.dim() >= 2, op, ": grad_out must be [N, D] or [N, J, D]; got shape ", shape_of(grad_out));
  const int64_t D = grad_out.size(-1);
  // A [J, M, 0] stand-in for W_dec lets check_slots validate the index range against n_latents.
  SAEFAST_CHECK(indices.dim() == 3, op, ": indices must be [N, J, K]; got shape ", shape_of(indices));
  const at::Tensor shape_probe = at::empty({indices.size(1), n_latents, 0}, grad_out.options());
  const SlotArgs s = check_slots(op, &values, indices, shape_probe, alpha, mask);
  const bool per_member = check_grad_out(op, grad_out, s.N, s.J, D).second;
  at::Tensor dW = new_output({s.J, s.M, D}, grad_out.options());
  if (dW.numel() == 0) return dW;
  const at::Tensor g = grad_out.contiguous(), v = values.to(at::kFloat).contiguous(), idx = indices.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  bucketed_backward<float>(g.data_ptr<float>(), per_member, v.data_ptr<float>(), idx.data_ptr<int64_t>(),
                           m.defined() ? m.data_ptr<bool>() : nullptr, a.data_ptr<float>(), nullptr, nullptr,
                           dW.data_ptr<float>(), s.N, s.J, s.K, s.M, D);
  return dW;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                              const at::Tensor& indices, const at::Tensor& W_dec,
                                                              const at::Tensor& alpha,
                                                              const c10::optional<at::Tensor>& mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "native_sparse_decode_backward";
  const SlotArgs s = check_slots(op, &values, indices, W_dec, alpha, mask);
  const bool per_member = check_grad_out(op, grad_out, s.N, s.J, s.D).second;
  // Masked-out slots are in no bucket: their dv is written here, every other one by its row's task.
  at::Tensor dv = mask.has_value() ? at::zeros({s.N, s.J, s.K}, indices.options().dtype(at::kFloat))
                                   : new_output({s.N, s.J, s.K}, indices.options().dtype(at::kFloat));
  at::Tensor dW = new_output({s.J, s.M, s.D}, grad_out.options());
  if (dW.numel() == 0 || dv.numel() == 0) {
    if (dv.numel() == 0) dW.zero_();
    else dv.zero_();
    return {dv, dW};
  }
  const at::Tensor g = grad_out.contiguous(), v = values.to(at::kFloat).contiguous(), idx = indices.contiguous();
  const at::Tensor a = alpha.to(at::kFloat).contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "native_sparse_decode_backward", [&] {
    bucketed_backward<scalar_t>(g.data_ptr<float>(), per_member, v.data_ptr<float>(), idx.data_ptr<int64_t>(),
                                m.defined() ? m.data_ptr<bool>() : nullptr, a.data_ptr<float>(),
                                W_dec.data_ptr<scalar_t>(), dv.data_ptr<float>(), dW.data_ptr<float>(), s.N, s.J, s.K,
                                s.M, s.D);
  });
  return {dv, dW};
}

TORCH_LIBRARY_IMPL(saefast, CPU, m) {
  m.impl("native_sparse_decode", &sparse_decode_cpu);
  m.impl("native_sparse_decode_grad_values", &sparse_decode_grad_values_cpu);
  m.impl("native_sparse_decode_grad_weight", &sparse_decode_grad_weight_cpu);
  m.impl("native_sparse_decode_backward", &sparse_decode_backward_cpu);
}

}  // namespace saefast
