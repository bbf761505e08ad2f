/*
 * saefast CUDA launchers: the C interface between the torch bindings (csrc/cuda_bindings.cpp) and the kernels
 * (the .cu files in csrc/cuda/).
 *
 * This header is plain C (it also compiles as C++): no torch, no C++ standard library. The .cu files include it and
 * nothing from torch, so they compile with a bare nvcc (see .ci/check_cuda.sh).
 *
 * Conventions shared by every launcher:
 *   - pointers are device pointers; "optional" pointers may be NULL;
 *   - strides are in elements (not bytes) and may be anything, including 0 (broadcast) or negative;
 *   - sizes and offsets that scale with N (N*J*K, N*J*D, J*M*D) are int64;
 *   - float tensors come with a SaefastDtype code; arithmetic is fp32 whatever the storage dtype;
 *   - every launcher enqueues its work on `stream`, validates nothing that the binding already validates (shapes,
 *     dtypes, devices), returns cudaErrorInvalidValue for an impossible configuration (a bad dtype code, a grid
 *     dimension past the hardware limit) and otherwise returns cudaGetLastError() after the launch;
 *   - empty problems (a zero size) launch nothing and return cudaSuccess, after writing whatever the contract says
 *     the output holds (e.g. the bias alone for a K = 0 decode).
 */
#ifndef SAEFAST_CUDA_LAUNCHERS_H
#define SAEFAST_CUDA_LAUNCHERS_H

#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Storage dtype of a float tensor. */
typedef enum SaefastDtype {
    SAEFAST_F32 = 0,
    SAEFAST_BF16 = 1,
    SAEFAST_F16 = 2
} SaefastDtype;

/* ---------------------------------------------------------------------------------------------------------------
 * Grouped GEMM (grouped_mm.cu)
 * ------------------------------------------------------------------------------------------------------------- */

/* Output tile of the grouped GEMM: each thread block computes one TILE_M x TILE_N tile of one group. */
#define SAEFAST_GEMM_TILE_M 64
#define SAEFAST_GEMM_TILE_N 64

/* One group g of a grouped GEMM: C[i, j] = sum_p A[i, p] * B[p, j], i < m, j < n, p < k.
 *   A[i, p] at a + i * a_stride_m + p * a_stride_k      (so a transposed view needs no copy)
 *   B[p, j] at b + p * b_stride_k + j * b_stride_n
 *   C[i, j] at c + i * c_stride_m + j * c_stride_n
 * tile_start: the number of output tiles of the groups before this one (exclusive prefix sum of
 * saefast_gemm_tiles(m, n) over the groups, in order); the kernel finds a block's group by binary search over it. */
typedef struct SaefastGemmProblem {
    const void* a;
    const void* b;
    void* c;
    int64_t m, n, k;
    int64_t a_stride_m, a_stride_k;
    int64_t b_stride_k, b_stride_n;
    int64_t c_stride_m, c_stride_n;
    int64_t tile_start;
} SaefastGemmProblem;

/* Output tiles of one m x n problem (0 when m or n is 0). */
static inline int64_t saefast_gemm_tiles(int64_t m, int64_t n) {
    if (m <= 0 || n <= 0) return 0;
    return ((m + SAEFAST_GEMM_TILE_M - 1) / SAEFAST_GEMM_TILE_M) *
           ((n + SAEFAST_GEMM_TILE_N - 1) / SAEFAST_GEMM_TILE_N);
}

/* All groups in one launch of total_tiles blocks. problems: DEVICE array of num_groups descriptors whose tile_start
 * are the prefix sums described above; total_tiles = sum of saefast_gemm_tiles over the groups. A, B and C share
 * `dtype` (fp32 / bf16 / fp16); accumulation is fp32, C is rounded once at the store. k = 0 writes zeros. */
cudaError_t saefast_grouped_mm(const SaefastGemmProblem* problems, int64_t num_groups, int64_t total_tiles,
                               int dtype, cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------------------------
 * Sparse ensemble decode and its backward (sparse_decode.cu)
 * ------------------------------------------------------------------------------------------------------------- */

/* Grid limits of the sparse kernels (the launchers return cudaErrorInvalidValue past them; the bindings check first):
 * D of the decode and of the CSR grad_weight (column blocks of 128 on grid y), J of the per-member decode (grid z). */
#define SAEFAST_SPARSE_MAX_D (65535LL * 128)
#define SAEFAST_SPARSE_MAX_J_PER_MEMBER 65535LL

/* The [N, J, K] slot tensors of J members with M latents each.
 *   values[n, j, k]  at values  + n * v_stride_n + j * v_stride_j + k * v_stride_k   (dtype values_dtype);
 *                    may be NULL for saefast_sparse_decode_grad_values, which does not read it;
 *   indices[n, j, k] at indices + n * i_stride_n + ...   int64, member-local latent;
 *   mask[n, j, k]    at mask    + n * m_stride_n + ...   bytes (torch.bool), nonzero = kept; NULL = all kept.
 * A slot is kept when its mask is set AND 0 <= index < M. A dropped slot contributes exactly 0: its value and its
 * weight row are never read (an out-of-range index is never dereferenced). */
typedef struct SaefastSlots {
    const void* values;
    int32_t values_dtype;
    int64_t v_stride_n, v_stride_j, v_stride_k;
    const int64_t* indices;
    int64_t i_stride_n, i_stride_j, i_stride_k;
    const uint8_t* mask;
    int64_t m_stride_n, m_stride_j, m_stride_k;
    int64_t N, J, K, M;
} SaefastSlots;

/* A gradient g of a decode output, [N, D] (combined: stride_j = 0) or [N, J, D] (per member).
 *   g[n, j, d] at data + n * stride_n + j * stride_j + d * stride_d   (dtype `dtype`). */
typedef struct SaefastGrad {
    const void* data;
    int32_t dtype;
    int64_t stride_n, stride_j, stride_d;
} SaefastGrad;

/* Decode.
 *   per_member = 0: out[n, d]    = bias[d]    + sum_j alpha[j] sum_k kept * values[n,j,k] * W_dec[j, indices[n,j,k], d]
 *   per_member = 1: out[n, j, d] = bias[j, d] +       alpha[j] sum_k kept * values[n,j,k] * W_dec[j, indices[n,j,k], d]
 * W_dec: contiguous [J, M, D] (dtype w_dtype); alpha: fp32 [J]; bias: contiguous [D] / [J, D] (dtype bias_dtype) or
 * NULL; out: contiguous [N, D] / [N, J, D] (dtype out_dtype), every element written. */
cudaError_t saefast_sparse_decode(SaefastSlots slots, const void* W_dec, int w_dtype, int64_t D, const float* alpha,
                                  const void* bias, int bias_dtype, void* out, int out_dtype, int per_member,
                                  cudaStream_t stream);

/* Gradient w.r.t. the values: dv[n, j, k] = alpha[j] * kept * <g[n, j, :], W_dec[j, indices[n, j, k], :]>,
 * out contiguous fp32 [N, J, K], 0 for dropped slots (slots.values is not read). */
cudaError_t saefast_sparse_decode_grad_values(SaefastGrad grad, SaefastSlots slots, const void* W_dec, int w_dtype,
                                              int64_t D, const float* alpha, float* out, cudaStream_t stream);

/* Gradient w.r.t. the weight, scattered with atomics:
 *   dW[j, m, d] += alpha[j] * sum_{(n, k): indices[n,j,k] = m, kept} values[n,j,k] * g[n, j, d]
 * dW contiguous fp32 [J, M, D], ZERO-FILLED BY THE CALLER. The order of the additions (hence the last bits) varies
 * from run to run. */
cudaError_t saefast_sparse_decode_grad_weight_atomic(SaefastGrad grad, SaefastSlots slots, int64_t D,
                                                     const float* alpha, float* dW, cudaStream_t stream);

/* Gradient w.r.t. the weight, deterministic (no atomics, bit-identical from run to run):
 *   dW[j, m, d] = alpha[j] * sum_{e in [row_ptr[r], row_ptr[r+1])} values[slot] * g[n, j, d],  r = j * M + m,
 * where slot = slot_ids[e] = n * J * K + j * K + k (flat id of a slot of member j with index m). row_ptr: int64
 * [J * M + 1] (row_ptr[0] = 0), slot_ids: int64, grouped by row and in ascending order within a row (a stable sort
 * of the keys j * M + index); the binding lists only kept slots, and the kernel still skips a listed slot whose
 * mask (when given) is unset. Each row is summed by one thread block in list order; every element of dW (contiguous
 * fp32 [J, M, D]) is written, 0 for rows with no slot, so dW needs no zero fill. */
cudaError_t saefast_sparse_decode_grad_weight_csr(SaefastGrad grad, SaefastSlots slots, int64_t D, const float* alpha,
                                                  const int64_t* row_ptr, const int64_t* slot_ids, float* dW,
                                                  cudaStream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SAEFAST_CUDA_LAUNCHERS_H */
