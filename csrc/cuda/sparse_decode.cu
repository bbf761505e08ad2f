// Sparse decode of J ensemble members in one launch, and its backward (values and weight gradients).
//
// The contract is that of the Triton kernels kernels/saefast_triton/sparse_decode.py and
// kernels/saefast_triton/sparse_decode_backward.py (their docstrings are the reference); the structs are documented in
// launchers.h. With
//     kept[n, j, k] = mask[n, j, k] (1 when no mask) AND 0 <= indices[n, j, k] < M
// and g[n, j, :] = grad_out[n, :] (combined, stride_j = 0) or grad_out[n, j, :] (per member):
//
//   decode          combined:   out[n, :]    = bias    + sum_j alpha[j] sum_k kept * values[n,j,k] * W_dec[j, idx, :]
//                   per member: out[n, j, :] = bias[j] +       alpha[j] sum_k kept * values[n,j,k] * W_dec[j, idx, :]
//   grad_values     dv[n, j, k] = alpha[j] * kept * <g[n, j, :], W_dec[j, idx, :]>          fp32 [N, J, K]
//   grad_weight     dW[j, m, :] = alpha[j] * sum_{(n, k): idx = m, kept} values[n,j,k] * g[n, j, :]   fp32 [J, M, D]
//                   (atomic scatter into a caller-zeroed dW, or deterministic over a CSR segmentation by (j, m))
//
// Dropped slots contribute exactly 0: their value and their weight row are never read (so a NaN there cannot leak,
// and an out-of-range index is never dereferenced; the host does not range-check indices on CUDA). All products and
// sums are fp32; outputs are rounded once at the store. Offsets that scale with N or J*M*D are int64.
//
// Kernels (all 1 thread = 1 column d or a stride of columns, so every weight-row / gradient-row access is coalesced):
//   decode          grid (token blocks of kDecodeTokens, column blocks of blockDim.x <= 128, J or 1). The block stages
//                   the coefficients alpha * value and the row offsets of kDecodeTokens x kDecodeChunk slots in shared
//                   memory (dropped slots flagged), then every thread adds coef * W_dec[row, d] into kDecodeTokens
//                   fp32 accumulators (independent loads: memory-level parallelism), adds the bias and stores.
//   grad_values     one warp per slot (grid-stride over the N*J*K slots): the lanes walk D, the warp reduces with
//                   shuffles in a fixed order; dropped slots write 0.
//   grad_weight     atomic: one warp per slot, the lanes atomically add alpha * value * g[n, j, d] into dW[j, idx, d].
//                   csr:    grid (rows j*M + m, grid-stride; column blocks). A block owns whole rows: it stages
//                           kCsrChunk (value, gradient-row offset) pairs of the row's slot list at a time and each
//                           thread sums its column sequentially in list order, then scales by alpha[j] and writes the
//                           row (0 for an empty one): no atomics, bit-identical from run to run.
#include <cstdint>

#include "dtype.cuh"
#include "launchers.h"

namespace saefast {
namespace {

constexpr int kMaxColumns = 128;   // threads (columns) per block in the decode and the CSR grad_weight
constexpr int kDecodeTokens = 8;   // tokens per decode block = fp32 accumulators per thread
constexpr int kDecodeChunk = 32;   // slots per token staged in shared memory at a time
constexpr int kWarpThreads = 256;  // block of the warp-per-slot kernels (8 warps)
constexpr int kCsrChunk = kMaxColumns;
static_assert(SAEFAST_SPARSE_MAX_D == kMaxGridYZ * kMaxColumns, "launchers.h states the D limit of these grids");
static_assert(SAEFAST_SPARSE_MAX_J_PER_MEMBER == kMaxGridYZ, "launchers.h states the J limit of these grids");

// Threads along D for a column-per-thread kernel: a multiple of 32 covering D, at most kMaxColumns.
inline int column_threads(int64_t D) {
    const int64_t t = ((D + 31) / 32) * 32;
    return static_cast<int>(t < kMaxColumns ? t : kMaxColumns);
}

// Blocks for a grid-stride loop over `work` items, `per_block` items per block per trip.
inline unsigned grid_stride_blocks(int64_t work, int64_t per_block) {
    const int64_t blocks = (work + per_block - 1) / per_block;
    return static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX);
}

// Slot (n, j, k) of `s`: kept flag and, when kept, the member-local index and (if read_value) the value as fp32.
// The mask is read first; the index only for an unmasked slot; the value only for a kept one.
struct Slot {
    bool kept;
    int64_t index;
    float value;
};

__device__ __forceinline__ Slot load_slot(const SaefastSlots& s, int64_t n, int64_t j, int64_t k, bool read_value) {
    Slot out{false, 0, 0.0f};
    if (s.mask != nullptr && s.mask[n * s.m_stride_n + j * s.m_stride_j + k * s.m_stride_k] == 0) return out;
    const int64_t idx = s.indices[n * s.i_stride_n + j * s.i_stride_j + k * s.i_stride_k];
    if (idx < 0 || idx >= s.M) return out;  // out of range: a dropped slot, never dereferenced
    out.kept = true;
    out.index = idx;
    if (read_value) {
        out.value = load_as_float(s.values, n * s.v_stride_n + j * s.v_stride_j + k * s.v_stride_k, s.values_dtype);
    }
    return out;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// ------------------------------------------------------------------------------------------------------------------
// Decode
// ------------------------------------------------------------------------------------------------------------------

template <typename W>
__global__ void __launch_bounds__(kMaxColumns)
sparse_decode_kernel(SaefastSlots s, const W* __restrict__ W_dec, int64_t D, const float* __restrict__ alpha,
                     const void* __restrict__ bias, int bias_dtype, void* __restrict__ out, int out_dtype,
                     int per_member) {
    __shared__ float coef_s[kDecodeTokens][kDecodeChunk];   // alpha[j] * value (0 for a dropped slot)
    __shared__ int64_t row_s[kDecodeTokens][kDecodeChunk];  // (j * M + index) * D, or -1 for a dropped slot

    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kDecodeTokens;
    const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    const bool d_ok = d < D;
    const int64_t j_lo = per_member ? static_cast<int64_t>(blockIdx.z) : 0;
    const int64_t j_count = per_member ? 1 : s.J;
    const int64_t slots = j_count * s.K;  // slots walked per token: (j, k) flattened, j-major

    float acc[kDecodeTokens];
#pragma unroll
    for (int t = 0; t < kDecodeTokens; ++t) acc[t] = 0.0f;

    for (int64_t c0 = 0; c0 < slots; c0 += kDecodeChunk) {
        for (int e = threadIdx.x; e < kDecodeTokens * kDecodeChunk; e += blockDim.x) {
            const int t = e / kDecodeChunk;
            const int c = e % kDecodeChunk;
            const int64_t n = n0 + t;
            const int64_t sc = c0 + c;
            float coef = 0.0f;
            int64_t row = -1;
            if (n < s.N && sc < slots) {
                const int64_t j = j_lo + sc / s.K;
                const int64_t k = sc % s.K;
                const Slot slot = load_slot(s, n, j, k, true);
                if (slot.kept) {
                    coef = alpha[j] * slot.value;
                    row = (j * s.M + slot.index) * D;
                }
            }
            coef_s[t][c] = coef;
            row_s[t][c] = row;
        }
        __syncthreads();
        if (d_ok) {
            const int c_end = static_cast<int>(slots - c0 < kDecodeChunk ? slots - c0 : kDecodeChunk);
            for (int c = 0; c < c_end; ++c) {
#pragma unroll
                for (int t = 0; t < kDecodeTokens; ++t) {
                    const int64_t row = row_s[t][c];
                    if (row >= 0) acc[t] = fmaf(coef_s[t][c], to_float(W_dec[row + d]), acc[t]);
                }
            }
        }
        __syncthreads();
    }

    if (!d_ok) return;
    const float b = bias == nullptr ? 0.0f : load_as_float(bias, j_lo * D * per_member + d, bias_dtype);
#pragma unroll
    for (int t = 0; t < kDecodeTokens; ++t) {
        const int64_t n = n0 + t;
        if (n >= s.N) break;
        const int64_t dst = per_member ? (n * s.J + j_lo) * D + d : n * D + d;
        store_from_float(out, dst, out_dtype, acc[t] + b);
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Gradient w.r.t. the values
// ------------------------------------------------------------------------------------------------------------------

template <typename W, typename G>
__global__ void __launch_bounds__(kWarpThreads)
grad_values_kernel(SaefastGrad grad, SaefastSlots s, const W* __restrict__ W_dec, int64_t D,
                   const float* __restrict__ alpha, float* __restrict__ out) {
    const G* __restrict__ g = static_cast<const G*>(grad.data);
    const int lane = threadIdx.x % 32;
    const int64_t warps_per_block = kWarpThreads / 32;
    const int64_t total = s.N * s.J * s.K;
    for (int64_t slot = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32; slot < total;
         slot += static_cast<int64_t>(gridDim.x) * warps_per_block) {
        const int64_t n = slot / (s.J * s.K);
        const int64_t j = (slot / s.K) % s.J;
        const int64_t k = slot % s.K;
        const Slot sl = load_slot(s, n, j, k, false);  // uniform across the warp
        float dv = 0.0f;
        if (sl.kept) {
            const W* __restrict__ w_row = W_dec + (j * s.M + sl.index) * D;
            const G* __restrict__ g_row = g + n * grad.stride_n + j * grad.stride_j;
            float acc = 0.0f;
            for (int64_t d = lane; d < D; d += 32) {
                acc = fmaf(to_float(g_row[d * grad.stride_d]), to_float(w_row[d]), acc);
            }
            dv = alpha[j] * warp_sum(acc);
        }
        if (lane == 0) out[slot] = dv;
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Gradient w.r.t. the weight
// ------------------------------------------------------------------------------------------------------------------

template <typename G>
__global__ void __launch_bounds__(kWarpThreads)
grad_weight_atomic_kernel(SaefastGrad grad, SaefastSlots s, int64_t D, const float* __restrict__ alpha,
                          float* __restrict__ dW) {
    const G* __restrict__ g = static_cast<const G*>(grad.data);
    const int lane = threadIdx.x % 32;
    const int64_t warps_per_block = kWarpThreads / 32;
    const int64_t total = s.N * s.J * s.K;
    for (int64_t slot = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32; slot < total;
         slot += static_cast<int64_t>(gridDim.x) * warps_per_block) {
        const int64_t n = slot / (s.J * s.K);
        const int64_t j = (slot / s.K) % s.J;
        const int64_t k = slot % s.K;
        const Slot sl = load_slot(s, n, j, k, true);
        if (!sl.kept) continue;
        const float coef = alpha[j] * sl.value;
        float* __restrict__ dst = dW + (j * s.M + sl.index) * D;
        const G* __restrict__ g_row = g + n * grad.stride_n + j * grad.stride_j;
        // Duplicate indices (in this warp's slot or another's) are separate atomic adds: they sum.
        for (int64_t d = lane; d < D; d += 32) atomicAdd(dst + d, coef * to_float(g_row[d * grad.stride_d]));
    }
}

template <typename G>
__global__ void __launch_bounds__(kMaxColumns)
grad_weight_csr_kernel(SaefastGrad grad, SaefastSlots s, int64_t D, const float* __restrict__ alpha,
                       const int64_t* __restrict__ row_ptr, const int64_t* __restrict__ slot_ids,
                       float* __restrict__ dW) {
    __shared__ float value_s[kCsrChunk];   // values[slot] as fp32
    __shared__ int64_t goff_s[kCsrChunk];  // offset of g[n, j, 0], or -1 for a listed slot whose mask is unset

    const G* __restrict__ g = static_cast<const G*>(grad.data);
    const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    const bool d_ok = d < D;
    const int64_t rows = s.J * s.M;
    const int64_t JK = s.J * s.K;
    const int chunk = blockDim.x;  // entries staged per trip: one per thread (blockDim.x <= kCsrChunk)
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t j = r / s.M;
        const int64_t start = row_ptr[r];
        const int64_t end = row_ptr[r + 1];
        float acc = 0.0f;
        for (int64_t e0 = start; e0 < end; e0 += chunk) {
            const int64_t e = e0 + threadIdx.x;
            if (e < end) {
                const int64_t slot = slot_ids[e];
                const int64_t n = slot / JK;
                const int64_t k = slot % s.K;
                const bool masked =
                    s.mask != nullptr && s.mask[n * s.m_stride_n + j * s.m_stride_j + k * s.m_stride_k] == 0;
                value_s[threadIdx.x] =
                    masked ? 0.0f
                           : load_as_float(s.values, n * s.v_stride_n + j * s.v_stride_j + k * s.v_stride_k,
                                           s.values_dtype);
                goff_s[threadIdx.x] = masked ? -1 : n * grad.stride_n + j * grad.stride_j;
            }
            __syncthreads();
            if (d_ok) {
                const int c_end = static_cast<int>(end - e0 < chunk ? end - e0 : chunk);
                for (int c = 0; c < c_end; ++c) {  // list order, whatever the chunking: deterministic
                    const int64_t goff = goff_s[c];
                    if (goff >= 0) acc = fmaf(value_s[c], to_float(g[goff + d * grad.stride_d]), acc);
                }
            }
            __syncthreads();
        }
        if (d_ok) dW[r * D + d] = alpha[j] * acc;
    }
}

}  // namespace
}  // namespace saefast

// ---------------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------------

extern "C" cudaError_t saefast_sparse_decode(SaefastSlots slots, const void* W_dec, int w_dtype, int64_t D,
                                             const float* alpha, const void* bias, int bias_dtype, void* out,
                                             int out_dtype, int per_member, cudaStream_t stream) {
    using namespace saefast;
    if (!valid_dtype(w_dtype) || !valid_dtype(out_dtype) || !valid_dtype(slots.values_dtype) ||
        (bias != nullptr && !valid_dtype(bias_dtype)))
        return cudaErrorInvalidValue;
    if (slots.N < 0 || slots.J < 0 || slots.K < 0 || slots.M < 0 || D < 0) return cudaErrorInvalidValue;
    per_member = per_member != 0;
    if (slots.N == 0 || D == 0 || (per_member && slots.J == 0)) return cudaSuccess;  // empty output
    const int threads = column_threads(D);
    const int64_t gx = (slots.N + kDecodeTokens - 1) / kDecodeTokens;
    const int64_t gy = (D + threads - 1) / threads;
    const int64_t gz = per_member ? slots.J : 1;
    if (gx > kMaxGridX || gy > kMaxGridYZ || gz > kMaxGridYZ) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
    dispatch_dtype(w_dtype, [&](auto tag) {
        using W = decltype(tag);
        sparse_decode_kernel<W><<<grid, threads, 0, stream>>>(slots, static_cast<const W*>(W_dec), D, alpha, bias,
                                                              bias_dtype, out, out_dtype, per_member);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t saefast_sparse_decode_grad_values(SaefastGrad grad, SaefastSlots slots, const void* W_dec,
                                                         int w_dtype, int64_t D, const float* alpha, float* out,
                                                         cudaStream_t stream) {
    using namespace saefast;
    if (!valid_dtype(w_dtype) || !valid_dtype(grad.dtype)) return cudaErrorInvalidValue;
    if (slots.N < 0 || slots.J < 0 || slots.K < 0 || slots.M < 0 || D < 0) return cudaErrorInvalidValue;
    const int64_t total = slots.N * slots.J * slots.K;
    if (total == 0) return cudaSuccess;
    const unsigned blocks = grid_stride_blocks(total, kWarpThreads / 32);
    dispatch_dtype(w_dtype, [&](auto w_tag) {
        using W = decltype(w_tag);
        dispatch_dtype(grad.dtype, [&](auto g_tag) {
            using G = decltype(g_tag);
            grad_values_kernel<W, G><<<blocks, kWarpThreads, 0, stream>>>(grad, slots, static_cast<const W*>(W_dec),
                                                                          D, alpha, out);
        });
    });
    return cudaGetLastError();
}

extern "C" cudaError_t saefast_sparse_decode_grad_weight_atomic(SaefastGrad grad, SaefastSlots slots, int64_t D,
                                                                const float* alpha, float* dW, cudaStream_t stream) {
    using namespace saefast;
    if (!valid_dtype(grad.dtype) || !valid_dtype(slots.values_dtype)) return cudaErrorInvalidValue;
    if (slots.N < 0 || slots.J < 0 || slots.K < 0 || slots.M < 0 || D < 0) return cudaErrorInvalidValue;
    const int64_t total = slots.N * slots.J * slots.K;
    if (total == 0 || slots.M == 0 || D == 0) return cudaSuccess;  // nothing to add to the zeroed dW
    const unsigned blocks = grid_stride_blocks(total, kWarpThreads / 32);
    dispatch_dtype(grad.dtype, [&](auto tag) {
        using G = decltype(tag);
        grad_weight_atomic_kernel<G><<<blocks, kWarpThreads, 0, stream>>>(grad, slots, D, alpha, dW);
    });
    return cudaGetLastError();
}

extern "C" cudaError_t saefast_sparse_decode_grad_weight_csr(SaefastGrad grad, SaefastSlots slots, int64_t D,
                                                             const float* alpha, const int64_t* row_ptr,
                                                             const int64_t* slot_ids, float* dW,
                                                             cudaStream_t stream) {
    using namespace saefast;
    if (!valid_dtype(grad.dtype) || !valid_dtype(slots.values_dtype)) return cudaErrorInvalidValue;
    if (slots.N < 0 || slots.J < 0 || slots.K < 0 || slots.M < 0 || D < 0) return cudaErrorInvalidValue;
    const int64_t rows = slots.J * slots.M;
    if (rows == 0 || D == 0) return cudaSuccess;  // empty dW
    const int threads = column_threads(D);
    const int64_t gy = (D + threads - 1) / threads;
    if (gy > kMaxGridYZ) return cudaErrorInvalidValue;
    const dim3 grid(grid_stride_blocks(rows, 1), static_cast<unsigned>(gy));
    dispatch_dtype(grad.dtype, [&](auto tag) {
        using G = decltype(tag);
        grad_weight_csr_kernel<G><<<grid, threads, 0, stream>>>(grad, slots, D, alpha, row_ptr, slot_ids, dW);
    });
    return cudaGetLastError();
}
