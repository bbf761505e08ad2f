// Shared helpers of the CPU ops: argument checks that raise Python ValueErrors, and per-element loads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace saefast {

// TORCH_CHECK_VALUE surfaces in Python as ValueError, the error type every saefast backend uses for bad input.
#define SAEFAST_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

inline std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_cpu(const at::Tensor& t, const char* name) {
  SAEFAST_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the native CPU op; got ", t.device());
}

inline bool is_float_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

// Loads of the three float storage types as fp32 (every product and sum of the ops is fp32).
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

// The inner loops of the sparse ops. A slot reads one row of D weights at a random latent: the rows of W (tens
// of MB) are not in cache, so the loops prefetch a few slots ahead (the row's every cache line) — that, not the
// arithmetic, sets their speed. Sums use fixed lanes so that they vectorise and stay bit-reproducible.
constexpr int64_t kPrefetchSlots = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 0);
}

// Prefetches the row of the slot kPrefetchSlots after (n, j, k) within token n's J·K slots (slot0 = (n·J + j)·K).
// Its index may be masked out or out of range: a prefetch never faults, and the address is only computed.
template <typename T>
inline void prefetch_slot(const T* W, const int64_t* idx, int64_t slot0, int64_t j, int64_t k, int64_t J, int64_t K,
                          int64_t M, int64_t D) {
  const int64_t ahead = k + kPrefetchSlots;
  const int64_t member = j + ahead / K;
  if (member < J) {
    const int64_t latent = idx[slot0 + ahead];
    if (latent >= 0 && latent < M) prefetch_row(W + (member * M + latent) * D, D);
  }
}

// acc[d] += c · row[d]
template <typename T>
inline void axpy_row(float* __restrict acc, float c, const T* __restrict row, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += c * to_float(row[d]);
}

// Σ_d g[d] · row[d], summed in 16 fixed lanes (then lane by lane): vectorised, and the same for any thread count.
template <typename T>
inline float dot_row(const float* __restrict g, const T* __restrict row, int64_t D) {
  constexpr int64_t L = 16;
  float lanes[L] = {0};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int64_t l = 0; l < L; ++l) lanes[l] += g[d + l] * to_float(row[d + l]);
  for (int64_t l = 0; d < D; ++d, ++l) lanes[l] += g[d] * to_float(row[d]);
  float sum = 0.0f;
  for (int64_t l = 0; l < L; ++l) sum += lanes[l];
  return sum;
}

// Test hook (saefast._C.set_poison_outputs): when set, outputs start as NaN (floats) or -1 (ints) instead of
// uninitialised memory, so an element a kernel forgets to write fails the reference comparison.
inline std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (!poison_outputs().load()) return at::empty(shape, options);
  if (at::isIntegralType(options.dtype().toScalarType(), /*includeBool=*/false)) return at::full(shape, -1, options);
  return at::full(shape, std::numeric_limits<float>::quiet_NaN(), options);
}

// The slots of each member bucketed by latent, for the latent-ordered backward passes: a stable counting sort, in
// (n, k) order, of the slots (n, j, k) that live(slot) accepts (slot = (n·J + j)·K + k). Member j's bucket of latent
// m is slots[member_ptr[j] + row_ptr[j·(M+1) + m] .. member_ptr[j] + row_ptr[j·(M+1) + m + 1]), as ids n·K + k.
// live must accept only slots whose idx lies in [0, M), and give the same answer both times it is asked (it is asked
// once per pass, counting then filling). Members are bucketed in parallel, each by one task: deterministic.
struct LatentBuckets {
  std::vector<int64_t> row_ptr;     // [J, M + 1]
  std::vector<int64_t> member_ptr;  // [J + 1]
  std::vector<int64_t> slots;
  const int64_t* bucket(int64_t j) const { return slots.data() + member_ptr[j]; }
  const int64_t* rows(int64_t j, int64_t M) const { return row_ptr.data() + j * (M + 1); }
};

template <typename Live>
LatentBuckets bucket_by_latent(const int64_t* idx, int64_t N, int64_t J, int64_t K, int64_t M, Live live) {
  LatentBuckets b{std::vector<int64_t>(J * (M + 1), 0), std::vector<int64_t>(J + 1, 0), {}};
  at::parallel_for(0, J, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      int64_t* rp = b.row_ptr.data() + j * (M + 1);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t slot = (n * J + j) * K + k;
          if (live(slot)) ++rp[idx[slot] + 1];
        }
      for (int64_t m = 0; m < M; ++m) rp[m + 1] += rp[m];
    }
  });
  for (int64_t j = 0; j < J; ++j) b.member_ptr[j + 1] = b.member_ptr[j] + b.row_ptr[j * (M + 1) + M];
  b.slots.resize(b.member_ptr[J]);
  at::parallel_for(0, J, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t* rp = b.row_ptr.data() + j * (M + 1);
      std::vector<int64_t> fill(rp, rp + M);
      int64_t* out = b.slots.data() + b.member_ptr[j];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t slot = (n * J + j) * K + k;
          if (live(slot)) out[fill[idx[slot]]++] = n * K + k;
        }
    }
  });
  return b;
}

// Fixed work partitions (never derived from the thread count), so that every result is bit-identical for any
// number of threads: each output element is produced by exactly one task, in a fixed order.
constexpr int64_t kRowGrain = 16;

}  // namespace saefast
