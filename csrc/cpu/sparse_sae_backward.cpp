// The whole sparse backward of a TopK / BatchTopK training step on the CPU, in one latent-ordered pass.
//
// Contract (oracle: saefast/ops/ref.py::sparse_sae_backward; Triton: kernels/saefast_triton/sparse_sae_backward.py):
//
//   native_sparse_sae_backward(x, b_dec, W_dec, values, indices, split, grad_out, aux_grad_out)
//     -> (dW_enc [J, M, D], db_enc [J, M], dW_dec [J, M, D], dpre [N, J, S]), all fp32
//
// Slots s < split of values / indices [N, J, S] are the codes, read with G = grad_out [N, J, D]; slots s >= split are
// AuxK's, read with G = aux_grad_out. X[n, j] = x[n] (x [N, D]) or x[n, j] (x [N, J, D]); b_dec is [J, D] or [1, D].
// For every slot of latent m = indices[n, j, s] whose value v is not 0:
//
//   dv = <G[n, j], W_dec[j, m]>,   dpre = v > 0 ? dv : 0                  (the ReLU of the codes)
//   dW_dec[j, m] += v·G[n, j],     dW_enc[j, m] += dpre·X[n, j],   db_enc[j, m] += dpre
//
// and at the end of each row dW_enc[j, m] -= db_enc[j, m]·b_dec[j] (the folded encoder bias b_enc − W_enc·b_dec:
// one axpy per row instead of one per slot). A slot whose value is 0 adds nothing and gets dpre = 0; its index is
// never read, so padding slots may hold any index. The rest of the backward follows from dpre (saefast/ops/
// sparse_sae_backward.py): db_dec[j] = −Σ_m db_enc[j, m]·W_enc[j, m] and dx = Σ dpre·W_enc[j, indices].
//
// Why one pass: the decoder gradient, the codes' gradient and the encoder gradient all walk the same slots by
// latent. The slots are bucketed once (a stable counting sort per member, in (n, s) order); then each latent row
// (j, m) is one task, which reads its decoder row once and, per slot, the slot's G and X rows once, and writes its
// dW_dec, dW_enc rows and db_enc once. Every output element is written by exactly one task in a fixed order, so the
// results are bit-identical for any number of threads.
#include "common.h"

#include <algorithm>
#include <vector>

namespace saefast {
namespace {

// The G and X rows of a slot are gathered at random: the first kHeadLines lines of the rows of the slot kSlotPrefetch
// ahead are prefetched, so that the hardware prefetcher is already streaming them when the slot is reached. Measured
// on the cpu bench shape (J = 8 × 4,096 latents, d = 512, N = 4,096, K = 32, 2 cores): 230 ms without, 177 ms with
// (2, 4); whole rows prefetched 4 slots ahead with a non-temporal hint made it 2× slower.
constexpr int64_t kSlotPrefetch = 2;
constexpr int64_t kHeadLines = 4;

// The first lines of a row, into every cache level: the hardware prefetcher then streams the rest of it.
inline void prefetch_head(const float* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t lines = std::min<int64_t>(kHeadLines, (D * 4 + 63) / 64);
  for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(p + 64 * l, 0, 3);
}

struct Sizes {
  int64_t N, J, S, M, D;
  bool per_member_x;
  bool shared_b_dec;
};

at::Tensor as_fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

Sizes check_arguments(const at::Tensor& x, const at::Tensor& b_dec, const at::Tensor& W_dec, const at::Tensor& values,
                      const at::Tensor& indices, int64_t split, const at::Tensor& grad_out,
                      const c10::optional<at::Tensor>& aux_grad_out) {
  const char* op = "native_sparse_sae_backward";
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&x, "x"}, {&b_dec, "b_dec"}, {&W_dec, "W_dec"},
                         {&values, "values"}, {&indices, "indices"}, {&grad_out, "grad_out"}})
    check_cpu(*t, name);
  SAEFAST_CHECK(indices.dim() == 3, op, ": indices must be [N, J, S]; got shape ", shape_of(indices));
  SAEFAST_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64; got ", indices.scalar_type());
  SAEFAST_CHECK(values.sizes() == indices.sizes(), op, ": values ", shape_of(values), " and indices ",
                shape_of(indices), " differ in shape");
  SAEFAST_CHECK(is_float_dtype(values.scalar_type()), op, ": values must be float32, bfloat16 or float16; got ",
                values.scalar_type());
  const int64_t N = indices.size(0), J = indices.size(1), S = indices.size(2);
  SAEFAST_CHECK(W_dec.dim() == 3 && W_dec.size(0) == J && W_dec.size(1) >= 1, op,
                ": W_dec must be [J, M, D] with J = ", J, " and M >= 1; got shape ", shape_of(W_dec));
  SAEFAST_CHECK(is_float_dtype(W_dec.scalar_type()), op, ": W_dec must be float32, bfloat16 or float16; got ",
                W_dec.scalar_type());
  const int64_t M = W_dec.size(1), D = W_dec.size(2);
  SAEFAST_CHECK(x.is_floating_point(), op, ": x must be a float tensor; got ", x.scalar_type());
  const bool per_member_x = x.dim() == 3;
  SAEFAST_CHECK((x.dim() == 2 && x.size(0) == N && x.size(1) == D) ||
                    (per_member_x && x.size(0) == N && x.size(1) == J && x.size(2) == D),
                op, ": x must be [N, D] = [", N, ", ", D, "] or [N, J, D] = [", N, ", ", J, ", ", D, "]; got shape ",
                shape_of(x));
  SAEFAST_CHECK(b_dec.is_floating_point() && b_dec.dim() == 2 && (b_dec.size(0) == J || b_dec.size(0) == 1) &&
                    b_dec.size(1) == D,
                op, ": b_dec must be a float [J, D] = [", J, ", ", D, "] or [1, D]; got ", b_dec.scalar_type(), " ",
                shape_of(b_dec));
  SAEFAST_CHECK(split >= 0 && split <= S, op, ": split must lie in [0, S = ", S, "]; got ", split);
  auto check_grad = [&](const at::Tensor& g, const char* name) {
    check_cpu(g, name);
    SAEFAST_CHECK(g.is_floating_point() && g.dim() == 3 && g.size(0) == N && g.size(1) == J && g.size(2) == D, op,
                  ": ", name, " must be a float [N, J, D] = [", N, ", ", J, ", ", D, "]; got ", g.scalar_type(), " ",
                  shape_of(g));
  };
  check_grad(grad_out, "grad_out");
  if (split < S) {
    SAEFAST_CHECK(aux_grad_out.has_value(), op, ": slots [split, S) = [", split, ", ", S,
                  ") are AuxK slots and need aux_grad_out");
    check_grad(*aux_grad_out, "aux_grad_out");
  }
  return {N, J, S, M, D, per_member_x, b_dec.size(0) == 1};
}

template <typename w_t>
void fused_rows(const float* x, const float* b_dec, const w_t* W, const float* v, const int64_t* idx, int64_t split,
                const float* g, const float* ga, const LatentBuckets& buckets, float* dW_enc,
                float* db_enc, float* dW_dec, float* dpre, const Sizes& s) {
  const int64_t J = s.J, S = s.S, M = s.M, D = s.D;
  auto G_row = [&](int64_t n, int64_t j, int64_t k) { return (k < split ? g : ga) + (n * J + j) * D; };
  auto X_row = [&](int64_t n, int64_t j) { return x + (s.per_member_x ? (n * J + j) * D : n * D); };
  at::parallel_for(0, J * M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t j = r / M, m = r % M;
      const int64_t* rp = buckets.rows(j, M);
      const int64_t* bucket = buckets.bucket(j);
      const w_t* w_row = W + r * D;
      float* dec = dW_dec + r * D;
      float* enc = dW_enc + r * D;
      std::fill(dec, dec + D, 0.0f);
      std::fill(enc, enc + D, 0.0f);
      float db = 0.0f;
      const int64_t begin = rp[m], end = rp[m + 1];
      for (int64_t e = begin; e < end; ++e) {
        if (e + kSlotPrefetch < end) {
          const int64_t ahead = bucket[e + kSlotPrefetch];
          prefetch_head(G_row(ahead / S, j, ahead % S), D);
          prefetch_head(X_row(ahead / S, j), D);
        }
        const int64_t n = bucket[e] / S, k = bucket[e] % S;
        const int64_t slot = (n * J + j) * S + k;
        const float* G = G_row(n, j, k);
        const float value = v[slot];
        const float dp = value > 0.0f ? dot_row(G, w_row, D) : 0.0f;
        dpre[slot] = dp;
        axpy_row(dec, value, G, D);
        if (dp != 0.0f) {
          axpy_row(enc, dp, X_row(n, j), D);
          db += dp;
        }
      }
      if (db != 0.0f) axpy_row(enc, -db, b_dec + (s.shared_b_dec ? 0 : j * D), D);
      db_enc[r] = db;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_sae_backward_cpu(
    const at::Tensor& x, const at::Tensor& b_dec, const at::Tensor& W_dec, const at::Tensor& values,
    const at::Tensor& indices, int64_t split, const at::Tensor& grad_out, const c10::optional<at::Tensor>& aux_grad_out) {
  // Kernels run below autograd: the ATen calls inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Sizes s = check_arguments(x, b_dec, W_dec, values, indices, split, grad_out, aux_grad_out);
  const int64_t N = s.N, J = s.J, S = s.S, M = s.M, D = s.D;
  const auto f32 = grad_out.options().dtype(at::kFloat);
  at::Tensor dW_enc = new_output({J, M, D}, f32), db_enc = new_output({J, M}, f32);
  at::Tensor dW_dec = new_output({J, M, D}, f32), dpre = new_output({N, J, S}, f32);
  if (J == 0 || M == 0) return {dW_enc, db_enc, dW_dec, dpre};
  const at::Tensor v = as_fp32(values), idx = indices.contiguous(), xf = as_fp32(x), bf = as_fp32(b_dec);
  const at::Tensor g = as_fp32(grad_out);
  const at::Tensor ga = split < S ? as_fp32(*aux_grad_out) : at::Tensor();
  const float* vp = v.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* dp = dpre.data_ptr<float>();

  // Bucket the live slots (value != 0) of each member by latent. Dead slots get dpre = 0 here; an out-of-range index
  // of a live slot is an error, reported after the (parallel) counting pass for its member's first such slot.
  std::vector<int64_t> bad(J, 0);
  std::vector<char> bad_found(J, 0);
  const LatentBuckets buckets = bucket_by_latent(ip, N, J, S, M, [&](int64_t slot) {
    if (vp[slot] == 0.0f) {
      dp[slot] = 0.0f;
      return false;
    }
    const int64_t latent = ip[slot], j = (slot / S) % J;
    if (latent >= 0 && latent < M) return true;
    if (!bad_found[j]) bad[j] = latent, bad_found[j] = 1;
    return false;
  });
  for (int64_t j = 0; j < J; ++j)
    SAEFAST_CHECK(!bad_found[j], "native_sparse_sae_backward: indices of slots with a non-zero value must lie in "
                  "[0, M = ", M, "); member ", j, " has ", bad[j]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W_dec.scalar_type(), "native_sparse_sae_backward", [&] {
    const at::Tensor W = W_dec.contiguous();
    fused_rows<scalar_t>(xf.data_ptr<float>(), bf.data_ptr<float>(), W.data_ptr<scalar_t>(), vp, ip, split,
                         g.data_ptr<float>(), ga.defined() ? ga.data_ptr<float>() : nullptr, buckets,
                         dW_enc.data_ptr<float>(), db_enc.data_ptr<float>(), dW_dec.data_ptr<float>(), dp, s);
  });
  return {dW_enc, db_enc, dW_dec, dpre};
}

TORCH_LIBRARY_IMPL(saefast, CPU, m) { m.impl("native_sparse_sae_backward", &sparse_sae_backward_cpu); }

}  // namespace saefast
