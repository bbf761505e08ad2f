// Fused encode → top-k and encode → threshold on the CPU: the N × J·M pre-activation matrix never exists.
//
// Same contracts as the Triton kernels in kernels/saefast_triton/topk_encode.py, with one addition: x may be [N, D]
// (one input for every member) or [N, J, D] (one input per member: bootstrap resamples, boosting chains), which makes
// the encoder a grouped GEMM — member j multiplies its own input.
//
//   native_topk_encode(x, W_enc [J, M, D], bias [J, M] fp32, k, dead [J, M] bool?, aux_k)
//       pre[n, j, m] = x[n] (or x[n, j]) · W_enc[j, m] + bias[j, m]
//       values [N, J, k] fp32, sorted descending (raw, no ReLU); indices [N, J, k] int64; ties: lower latent first
//       aux_values / aux_indices [N, J, aux_k]: the aux_k largest pre over the latents with dead[j, m], sorted;
//       a slot beyond member j's dead count holds -inf and index 0. [N, J, 0] when dead is None or aux_k == 0.
//   native_threshold_encode(x, W_enc, bias, lower [J, M] fp32, capacity)
//       every pre[n, j, m] > lower[j, m], in ascending latent order: values / indices [N, J, capacity] (padding:
//       value 0, index 0), counts [N, J] int64 before truncation, overflow = (counts > capacity).any() (a bool
//       scalar; the row keeps its capacity lowest-index latents). Never raises on overflow: the caller decides.
//
// Work split: tasks (member j, block of kRows tokens), j-major so each thread streams one member's encoder at a
// time (it stays in cache across that member's row blocks). A task walks the M latents in tiles of kCols: one
// single-threaded GEMM (at::addmm_out into a thread-private [kRows, kCols] fp32 buffer) per tile, whose entries are
// merged into each row's running top-k (a sorted insertion with a vectorisable "anything above the current k-th?"
// pre-test per 16 entries, so most entries cost one compare). The partition is fixed, never derived from the
// thread count, so results are bit-identical for any number of threads. x and W_enc are fp32; bf16/fp16 inputs are
// converted to fp32 first (a copy), as the Triton kernels also accumulate in fp32. NaN pre-activations are not
// supported (validate inputs first); -0.0 and +0.0 compare equal (ties then go to the lower latent).
#include "common.h"

#include <algorithm>
#include <functional>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <limits>
#include <vector>

namespace saefast {
namespace {

constexpr int64_t kRows = 256;
constexpr int64_t kCols = 2048;
constexpr int64_t kChunk = 16;
// Up to this many slots a running top-k is a sorted array (insertion); beyond, an append buffer of
// kBufferFactor·cap entries, cut back to cap by nth_element when full.
constexpr int64_t kInsertionCap = 64;
constexpr int64_t kBufferFactor = 4;

struct EncodeArgs {
  int64_t N, D, J, M;
  bool per_member_input;
};

EncodeArgs check_encoder(const char* op, const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& bias) {
  check_cpu(x, "x");
  check_cpu(W_enc, "W_enc");
  check_cpu(bias, "bias");
  SAEFAST_CHECK(W_enc.dim() == 3, op, ": W_enc must be [J, M, D]; got shape ", shape_of(W_enc));
  const int64_t J = W_enc.size(0), M = W_enc.size(1), D = W_enc.size(2);
  SAEFAST_CHECK(J >= 1 && M >= 1, op, ": W_enc needs J >= 1 members of M >= 1 latents; got shape ", shape_of(W_enc));
  SAEFAST_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [N, D] or [N, J, D]; got shape ", shape_of(x));
  SAEFAST_CHECK(x.size(-1) == D, op, ": x has D = ", x.size(-1), " but W_enc is [J, M, D = ", D, "]");
  if (x.dim() == 3)
    SAEFAST_CHECK(x.size(1) == J, op, ": a per-member input x must be [N, J = ", J, ", D]; got shape ", shape_of(x));
  SAEFAST_CHECK(is_float_dtype(x.scalar_type()), op, ": x must be float32, float16 or bfloat16; got ", x.scalar_type());
  SAEFAST_CHECK(W_enc.scalar_type() == x.scalar_type(), op, ": W_enc dtype ", W_enc.scalar_type(),
                " differs from x dtype ", x.scalar_type());
  SAEFAST_CHECK(bias.dim() == 2 && bias.size(0) == J && bias.size(1) == M, op, ": bias must be [J, M] = [", J, ", ", M,
                "]; got shape ", shape_of(bias));
  SAEFAST_CHECK(bias.scalar_type() == at::kFloat, op, ": bias must be float32; got ", bias.scalar_type());
  return {x.size(0), D, J, M, x.dim() == 3};
}

void check_latent_mask(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t J,
                       int64_t M) {
  check_cpu(t, name);
  SAEFAST_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == J && t.size(1) == M, op, ": ", name,
                " must be a ", dtype, " tensor [J, M] = [", J, ", ", M, "]; got ", t.scalar_type(), " ", shape_of(t));
}

// Bit e of the result is set when p[e] > floor, for the kChunk = 16 values at p (one compare on AVX-512).
inline uint32_t above_mask(const float* p, float floor) {
#if defined(__AVX512F__)
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(floor), _CMP_GT_OQ));
#elif defined(__AVX2__)
  const __m256 f = _mm256_set1_ps(floor);
  const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), f, _CMP_GT_OQ)));
  const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), f, _CMP_GT_OQ)));
  return lo | (hi << 8);
#else
  uint32_t bits = 0;
  for (int e = 0; e < 16; ++e) bits |= static_cast<uint32_t>(p[e] > floor) << e;
  return bits;
#endif
}

// A running top-`cap` of (value, latent) pairs, ranked by value descending then latent ascending. Entries above
// the current floor are appended to a buffer of kBufferFactor·cap; a full buffer is cut back to its top `cap` with
// nth_element, and the floor rises to the cap-th value. Latents arrive in ascending order, so an entry equal to the
// floor ranks below the one that set it and is rejected by the strict `>`. Each entry costs O(1) amortised (no
// sorted insertion), and `finish` sorts the survivors once.
struct RunningTopK {
  int64_t cap;
  std::vector<float> v;
  std::vector<int64_t> i;
  int64_t size = 0;
  float floor_value = -std::numeric_limits<float>::infinity();

  explicit RunningTopK(int64_t cap_) : cap(cap_), v(kBufferFactor * cap_), i(kBufferFactor * cap_) {}

  void reset() {
    size = 0;
    floor_value = -std::numeric_limits<float>::infinity();
  }

  float floor() const { return floor_value; }

  void offer(float value, int64_t latent) {
    if (!(value > floor_value)) return;
    if (cap <= kInsertionCap) {  // small cap: keep the first `cap` slots sorted by insertion
      int64_t pos = size < cap ? size++ : cap - 1;
      while (pos > 0 && v[pos - 1] < value) {  // strict: equal earlier entries (lower latents) stay ahead
        v[pos] = v[pos - 1];
        i[pos] = i[pos - 1];
        --pos;
      }
      v[pos] = value;
      i[pos] = latent;
      if (size == cap) floor_value = v[cap - 1];
      return;
    }
    v[size] = value;
    i[size] = latent;
    if (++size == kBufferFactor * cap) cut();
  }

  // Keeps the top `cap` and raises the floor to the smallest of them: nth_element on a copy of the values finds
  // the cap-th largest t, then a stable compaction keeps every entry > t and the earliest (lowest-latent) entries
  // equal to t. Stability keeps the buffer in ascending latent order, which the tie rule relies on.
  void cut() {
    thread_local std::vector<float> copy;
    copy.assign(v.begin(), v.begin() + size);
    std::nth_element(copy.begin(), copy.begin() + (cap - 1), copy.end(), std::greater<float>());
    const float t = copy[cap - 1];
    int64_t need_equal = cap;
    for (int64_t e = 0; e < size; ++e) need_equal -= v[e] > t;
    int64_t kept = 0;
    for (int64_t e = 0; e < size; ++e) {
      if (v[e] > t || (v[e] == t && need_equal-- > 0)) {
        v[kept] = v[e];
        i[kept] = i[e];
        ++kept;
      }
    }
    size = kept;
    floor_value = t;
  }

  // Writes the top min(size, cap) sorted into out_v / out_i; returns how many.
  int64_t finish(float* out_v, int64_t* out_i) {
    if (size > cap) cut();  // sort cap entries, not the whole buffer
    std::vector<int64_t>& order = scratch();
    order.resize(size);
    for (int64_t e = 0; e < size; ++e) order[e] = e;
    const auto ranks_above = [this](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && i[a] < i[b]); };
    const int64_t n = std::min(size, cap);
    std::partial_sort(order.begin(), order.begin() + n, order.end(), ranks_above);
    for (int64_t e = 0; e < n; ++e) {
      out_v[e] = v[order[e]];
      out_i[e] = i[order[e]];
    }
    return n;
  }

 private:
  static std::vector<int64_t>& scratch() {
    thread_local std::vector<int64_t> order;
    return order;
  }
};

// Calls fn(task_rows [n0, n1), member j, tile pointer, m0, cols) for every [kRows, kCols] tile of pre-activations,
// with per-task state set up by begin(j, n0, n1) and finished by end(j, n0, n1).
template <typename Begin, typename Tile, typename End>
void for_each_tile(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& bias, const EncodeArgs& a,
                   Begin begin, Tile tile_fn, End end) {
  const int64_t row_blocks = (a.N + kRows - 1) / kRows;
  at::parallel_for(0, a.J * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buffer(kRows * std::min(kCols, a.M));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t / row_blocks;
      const int64_t n0 = (t % row_blocks) * kRows, n1 = std::min(a.N, n0 + kRows);
      at::Tensor x_blk = a.per_member_input ? x.select(1, j).narrow(0, n0, n1 - n0) : x.narrow(0, n0, n1 - n0);
      const at::Tensor W_j = W_enc.select(0, j);
      const at::Tensor b_j = bias.select(0, j);
      begin(j, n0, n1);
      for (int64_t m0 = 0; m0 < a.M; m0 += kCols) {
        const int64_t cols = std::min(kCols, a.M - m0);
        at::Tensor tile = at::from_blob(buffer.data(), {n1 - n0, cols}, x.options().dtype(at::kFloat));
        at::addmm_out(tile, b_j.narrow(0, m0, cols), x_blk, W_j.narrow(0, m0, cols).t());
        tile_fn(j, n0, n1, buffer.data(), m0, cols);
      }
      end(j, n0, n1);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(
    const at::Tensor& x_in, const at::Tensor& W_in, const at::Tensor& bias, int64_t k,
    const c10::optional<at::Tensor>& dead, int64_t aux_k) {
  // Kernels run below autograd: the ATen calls inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "native_topk_encode";
  const EncodeArgs a = check_encoder(op, x_in, W_in, bias);
  SAEFAST_CHECK(1 <= k && k <= a.M, op, ": k must satisfy 1 <= k <= M = ", a.M, "; got ", k);
  SAEFAST_CHECK(0 <= aux_k && aux_k <= a.M, op, ": aux_k must satisfy 0 <= aux_k <= M = ", a.M, "; got ", aux_k);
  if (dead.has_value()) check_latent_mask(op, "dead", *dead, at::kBool, a.J, a.M);
  SAEFAST_CHECK(aux_k == 0 || dead.has_value(), op, ": aux_k > 0 needs the dead-latent mask dead [J, M]");
  const int64_t ak = dead.has_value() ? aux_k : 0;
  const auto f32 = x_in.options().dtype(at::kFloat);
  const auto i64 = x_in.options().dtype(at::kLong);
  at::Tensor values = new_output({a.N, a.J, k}, f32), indices = new_output({a.N, a.J, k}, i64);
  at::Tensor aux_values = new_output({a.N, a.J, ak}, f32), aux_indices = new_output({a.N, a.J, ak}, i64);
  if (a.N == 0) return {values, indices, aux_values, aux_indices};
  // Detached: the GEMMs below run inside OpenMP threads, where the autograd-exclusion guard does not reach.
  const at::Tensor x = x_in.detach().to(at::kFloat), W_enc = W_in.detach().to(at::kFloat).contiguous();
  const at::Tensor b = bias.detach().contiguous();

  // Each member's dead latents, ascending (AuxK scans only these).
  std::vector<std::vector<int64_t>> dead_latents(a.J);
  if (ak > 0) {
    const at::Tensor d = dead->contiguous();
    const bool* dp = d.data_ptr<bool>();
    for (int64_t j = 0; j < a.J; ++j)
      for (int64_t m = 0; m < a.M; ++m)
        if (dp[j * a.M + m]) dead_latents[j].push_back(m);
  }
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  float* avp = aux_values.data_ptr<float>();
  int64_t* aip = aux_indices.data_ptr<int64_t>();
  const int64_t J = a.J;
  thread_local std::vector<RunningTopK> top, aux;  // per row of the current task
  for_each_tile(
      x, W_enc, b, a,
      [&](int64_t, int64_t n0, int64_t n1) {
        const int64_t rows = n1 - n0;
        if (static_cast<int64_t>(top.size()) < rows || (!top.empty() && top[0].cap != k)) top.assign(rows, RunningTopK(k));
        if (ak > 0 && (static_cast<int64_t>(aux.size()) < rows || aux[0].cap != ak)) aux.assign(rows, RunningTopK(ak));
        for (int64_t r = 0; r < rows; ++r) {
          top[r].reset();
          if (ak > 0) aux[r].reset();
        }
      },
      [&](int64_t j, int64_t n0, int64_t n1, const float* tile, int64_t m0, int64_t cols) {
        const std::vector<int64_t>& dl = dead_latents[j];
        const auto dead_begin = std::lower_bound(dl.begin(), dl.end(), m0);
        const auto dead_end = std::lower_bound(dl.begin(), dl.end(), m0 + cols);
        for (int64_t r = 0; r < n1 - n0; ++r) {
          const float* p = tile + r * cols;
          RunningTopK& t = top[r];
          int64_t c = 0;
          for (; c + kChunk <= cols; c += kChunk) {
            // Bit e set: p[c + e] is above the floor. Most chunks have none once the floor has risen; the rest
            // offer only their set bits, in ascending latent order.
            for (uint32_t bits = above_mask(p + c, t.floor()); bits != 0; bits &= bits - 1) {
              const int e = __builtin_ctz(bits);
              t.offer(p[c + e], m0 + c + e);
            }
          }
          for (; c < cols; ++c) t.offer(p[c], m0 + c);
          if (ak > 0)
            for (auto it = dead_begin; it != dead_end; ++it) aux[r].offer(p[*it - m0], *it);
        }
      },
      [&](int64_t j, int64_t n0, int64_t n1) {
        for (int64_t r = 0; r < n1 - n0; ++r) {
          const int64_t row = (n0 + r) * J + j;
          top[r].finish(vp + row * k, ip + row * k);
          if (ak == 0) continue;
          for (int64_t s = aux[r].finish(avp + row * ak, aip + row * ak); s < ak; ++s) {  // fewer dead than aux_k
            avp[row * ak + s] = -std::numeric_limits<float>::infinity();
            aip[row * ak + s] = 0;
          }
        }
      });
  return {values, indices, aux_values, aux_indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> threshold_encode_cpu(
    const at::Tensor& x_in, const at::Tensor& W_in, const at::Tensor& bias, const at::Tensor& lower, int64_t capacity) {
  // Kernels run below autograd: the ATen calls inside must not record a graph.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const char* op = "native_threshold_encode";
  const EncodeArgs a = check_encoder(op, x_in, W_in, bias);
  check_latent_mask(op, "lower", lower, at::kFloat, a.J, a.M);
  SAEFAST_CHECK(1 <= capacity && capacity <= a.M, op, ": capacity must satisfy 1 <= capacity <= M = ", a.M, "; got ",
                capacity);
  const auto f32 = x_in.options().dtype(at::kFloat);
  const auto i64 = x_in.options().dtype(at::kLong);
  at::Tensor values = at::zeros({a.N, a.J, capacity}, f32), indices = at::zeros({a.N, a.J, capacity}, i64);
  at::Tensor counts = at::zeros({a.N, a.J}, i64);
  if (a.N == 0) return {values, indices, counts, at::zeros({}, x_in.options().dtype(at::kBool))};
  // Detached: the GEMMs below run inside OpenMP threads, where the autograd-exclusion guard does not reach.
  const at::Tensor x = x_in.detach().to(at::kFloat), W_enc = W_in.detach().to(at::kFloat).contiguous();
  const at::Tensor b = bias.detach().contiguous();
  const at::Tensor lo = lower.contiguous();
  const float* lp = lo.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  const int64_t J = a.J, M = a.M;
  for_each_tile(
      x, W_enc, b, a, [](int64_t, int64_t, int64_t) {},
      [&](int64_t j, int64_t n0, int64_t n1, const float* tile, int64_t m0, int64_t cols) {
        const float* lj = lp + j * M + m0;
        for (int64_t r = 0; r < n1 - n0; ++r) {
          const int64_t row = (n0 + r) * J + j;
          const float* p = tile + r * cols;
          int64_t count = cp[row];
          for (int64_t c = 0; c < cols; ++c) {
            if (p[c] > lj[c]) {
              if (count < capacity) {
                vp[row * capacity + count] = p[c];
                ip[row * capacity + count] = m0 + c;
              }
              ++count;
            }
          }
          cp[row] = count;
        }
      },
      [](int64_t, int64_t, int64_t) {});
  return {values, indices, counts, counts.gt(capacity).any()};
}

TORCH_LIBRARY_IMPL(saefast, CPU, m) {
  m.impl("native_topk_encode", &topk_encode_cpu);
  m.impl("native_threshold_encode", &threshold_encode_cpu);
}

}  // namespace saefast
