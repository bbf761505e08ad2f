// Row gather from many sources into one batch, converting on the way (the activation store's batch assembly):
//
//   out[n] = convert(sources[source[n]][row[n]])      n = 0 .. N − 1
//
// Each source is a C-contiguous [R_s, ...] tensor (a block of a memory-mapped shard file); every source has the same
// row shape and dtype. Rows are read once and written once: same dtype → one memcpy per row; bf16/fp16/fp32 into
// another of those three → one converting pass per row (bf16 and fp16 widen exactly; narrowing rounds to nearest
// even, as torch's copy_). The oracle is saefast.ops.ref.gather_rows.
//
// No software prefetch: rows are whole runs of cache lines that the hardware prefetcher follows, and prefetching the
// next rows measured 1.7× slower (d = 2,304 bf16 from the page cache). It runs on the calling thread, on purpose:
// the store's gather workers call it from several threads at once, beside a training step that has torch's own
// pool; a nested parallel_for would oversubscribe the cores.
#include <cstring>

#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace saefast {
namespace {

// Copies one row with streaming (non-temporal) stores where it can: a batch is tens of MB, far larger than the
// caches, so an ordinary store first reads each destination line (a third of the traffic) only to overwrite it.
inline void copy_row(char* dst, const char* src, int64_t bytes) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0 && (bytes & 15) == 0) {
    for (int64_t b = 0; b < bytes; b += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + b));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + b), v);
    }
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

template <typename S, typename O>
void convert_rows(const std::vector<const S*>& src, const int64_t* source, const int64_t* row, O* out, int64_t N,
                  int64_t C) {
  for (int64_t n = 0; n < N; ++n) {
    const S* in = src[source[n]] + row[n] * C;
    O* o = out + n * C;
    for (int64_t c = 0; c < C; ++c) o[c] = from_float<O>(to_float(in[c]));
  }
}

// bf16 → fp32 is a 16-bit shift of the bits; written out so that it vectorises (the generic path goes through a
// function call per element on some compilers).
void bf16_rows_to_float(const std::vector<const uint16_t*>& src, const int64_t* source, const int64_t* row,
                        float* out, int64_t N, int64_t C) {
  const bool stream = (reinterpret_cast<uintptr_t>(out) & 15) == 0 && C % 8 == 0;
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* in = src[source[n]] + row[n] * C;
    uint32_t* o = reinterpret_cast<uint32_t*>(out + n * C);
#if defined(__SSE2__)
    if (stream) {
      // Eight bf16 at a time: interleaving zeros below each gives the eight fp32 (bits << 16); streaming stores.
      const __m128i zero = _mm_setzero_si128();
      for (int64_t c = 0; c < C; c += 8) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + c));
        _mm_stream_si128(reinterpret_cast<__m128i*>(o + c), _mm_unpacklo_epi16(zero, v));
        _mm_stream_si128(reinterpret_cast<__m128i*>(o + c + 4), _mm_unpackhi_epi16(zero, v));
      }
      continue;
    }
#endif
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<uint32_t>(in[c]) << 16;
  }
#if defined(__SSE2__)
  if (stream) _mm_sfence();
#endif
}

// The sources' first elements, as T (the element type of a pass; bytes for the same-dtype copy).
template <typename T>
std::vector<const T*> source_pointers(at::TensorList sources) {
  std::vector<const T*> src;
  src.reserve(sources.size());
  for (const auto& s : sources) src.push_back(reinterpret_cast<const T*>(s.data_ptr()));
  return src;
}

template <typename S, typename O>
void convert_dispatch(at::TensorList sources, const int64_t* source, const int64_t* row, const at::Tensor& out,
                      int64_t N, int64_t C) {
  convert_rows<S, O>(source_pointers<S>(sources), source, row, reinterpret_cast<O*>(out.data_ptr()), N, C);
}

template <typename S>
void convert_to(at::TensorList sources, const int64_t* source, const int64_t* row,
                const at::Tensor& out, int64_t N, int64_t C) {
  switch (out.scalar_type()) {
    case at::kFloat: return convert_dispatch<S, float>(sources, source, row, out, N, C);
    case at::kBFloat16: return convert_dispatch<S, c10::BFloat16>(sources, source, row, out, N, C);
    default: return convert_dispatch<S, c10::Half>(sources, source, row, out, N, C);
  }
}

void gather_rows_cpu(at::TensorList sources, const at::Tensor& source_index, const at::Tensor& row_index,
                     const at::Tensor& out) {
  const char* op = "native_gather_rows_";
  SAEFAST_CHECK(!sources.empty(), op, ": sources is empty");
  check_cpu(out, "out");
  check_cpu(source_index, "source_index");
  check_cpu(row_index, "row_index");
  SAEFAST_CHECK(source_index.scalar_type() == at::kLong && row_index.scalar_type() == at::kLong, op,
                ": source_index and row_index must be int64; got ", source_index.scalar_type(), " and ",
                row_index.scalar_type());
  SAEFAST_CHECK(source_index.dim() == 1 && row_index.dim() == 1 && source_index.size(0) == row_index.size(0), op,
                ": source_index and row_index must be 1-d of one length; got ", shape_of(source_index), " and ",
                shape_of(row_index));
  SAEFAST_CHECK(source_index.is_contiguous() && row_index.is_contiguous(), op, ": the indices must be contiguous");
  const at::Tensor& first = sources[0];
  SAEFAST_CHECK(first.dim() >= 1, op, ": sources must have a row axis; got a 0-d tensor");
  const int64_t N = source_index.size(0);
  SAEFAST_CHECK(out.dim() == first.dim() && out.size(0) == N && out.sizes().slice(1) == first.sizes().slice(1), op,
                ": out must be [", N, ", *row shape ", c10::str(first.sizes().slice(1)), "]; got ", shape_of(out));
  SAEFAST_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  const auto dtype = first.scalar_type();
  for (size_t s = 0; s < sources.size(); ++s) {
    const at::Tensor& t = sources[s];
    check_cpu(t, "sources");
    SAEFAST_CHECK(t.scalar_type() == dtype, op, ": every source must have one dtype; source ", s, " is ",
                  t.scalar_type(), ", source 0 is ", dtype);
    SAEFAST_CHECK(t.dim() == first.dim() && t.sizes().slice(1) == first.sizes().slice(1), op,
                  ": every source must have one row shape; source ", s, " is ", shape_of(t), ", source 0 is ",
                  shape_of(first));
    SAEFAST_CHECK(t.is_contiguous(), op, ": source ", s, " must be contiguous");
  }
  const bool same = out.scalar_type() == dtype;
  SAEFAST_CHECK(same || (is_float_dtype(dtype) && is_float_dtype(out.scalar_type())), op,
                ": converts only among float32, bfloat16 and float16; got ", dtype, " into ", out.scalar_type());
  const int64_t* source = source_index.data_ptr<int64_t>();
  const int64_t* row = row_index.data_ptr<int64_t>();
  const int64_t n_sources = static_cast<int64_t>(sources.size());
  // Every index is checked before any row is written (a bad one names its position).
  for (int64_t n = 0; n < N; ++n) {
    SAEFAST_CHECK(source[n] >= 0 && source[n] < n_sources, op, ": source_index[", n, "] = ", source[n],
                  " is outside [0, ", n_sources, ")");
    const int64_t rows = sources[source[n]].size(0);
    SAEFAST_CHECK(row[n] >= 0 && row[n] < rows, op, ": row_index[", n, "] = ", row[n], " is outside [0, ", rows,
                  ") of source ", source[n]);
  }
  if (N == 0) return;
  const int64_t C = out.numel() / N;
  if (same) {
    const int64_t row_bytes = C * static_cast<int64_t>(out.element_size());
    const std::vector<const char*> src = source_pointers<char>(sources);
    char* o = static_cast<char*>(out.data_ptr());
    for (int64_t n = 0; n < N; ++n) {
      copy_row(o + n * row_bytes, src[source[n]] + row[n] * row_bytes, row_bytes);
    }
#if defined(__SSE2__)
    _mm_sfence();  // the streaming stores are visible before the op returns
#endif
    return;
  }
  if (dtype == at::kBFloat16 && out.scalar_type() == at::kFloat) {
    bf16_rows_to_float(source_pointers<uint16_t>(sources), source, row, out.data_ptr<float>(), N, C);
    return;
  }
  switch (dtype) {
    case at::kFloat: return convert_to<float>(sources, source, row, out, N, C);
    case at::kBFloat16: return convert_to<c10::BFloat16>(sources, source, row, out, N, C);
    default: return convert_to<c10::Half>(sources, source, row, out, N, C);
  }
}

}  // namespace
}  // namespace saefast

TORCH_LIBRARY_IMPL(saefast, CPU, m) { m.impl("native_gather_rows_", &saefast::gather_rows_cpu); }
