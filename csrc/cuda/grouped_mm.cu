// Grouped GEMM: G independent matrix products of different sizes in ONE launch.
//
// Contract (see SaefastGemmProblem in launchers.h):
//
//     for every group g < G:   C_g[i, j] = sum_p A_g[i, p] * B_g[p, j],   i < m_g, j < n_g, p < k_g
//
// * every operand is a base pointer plus (row stride, column stride) in elements, so transposed or sliced views are
//   read in place (strides may be 0 or negative; no alignment is assumed);
// * A, B and C share one dtype: fp32, bf16 or fp16. Products and sums are fp32 (plain FMAs, no TF32), C is rounded
//   once at the store;
// * ragged sizes: m_g, n_g, k_g differ per group; a group with m_g = 0 or n_g = 0 has no tile and is never touched;
//   k_g = 0 writes zeros into its m_g x n_g output;
// * `problems` is a DEVICE array of the G descriptors; problems[g].tile_start is the number of 64 x 64 output tiles of
//   the groups before g (an exclusive prefix sum of saefast_gemm_tiles(m, n)), total_tiles the sum over all groups.
//
// Kernel: a 1-D grid over the output tiles of all groups (grid-stride, so any number of tiles fits). A block finds its
// group by binary search over tile_start (the last group whose tile_start <= tile: always a non-empty group, since an
// empty group shares its tile_start with the next one), then computes a 64 x 64 tile of C: 256 threads, each a 4 x 4
// register sub-tile at rows ty + 16 i and columns tx + 16 j (so shared-memory reads are broadcasts or
// consecutive words), over K in steps of 16. Each step stages a 64 x 16 tile of A and a 16 x 64 tile of B in shared
// memory as fp32, loaded with the thread-to-element mapping that makes global reads coalesced for the operand's
// layout (along k when the k stride is 1, else along m / n), and prefetches the next step's elements into registers
// while the current one is multiplied. Elements outside the problem load as 0 and are never stored.
#include <cstdint>

#include "dtype.cuh"
#include "launchers.h"

namespace saefast {
namespace {

constexpr int kTileM = SAEFAST_GEMM_TILE_M;  // 64
constexpr int kTileN = SAEFAST_GEMM_TILE_N;  // 64
constexpr int kTileK = 16;
constexpr int kThreads = 256;
constexpr int kSub = 4;                                 // 4 x 4 outputs per thread
constexpr int kLoadsA = kTileM * kTileK / kThreads;     // 4 elements of A per thread per step
constexpr int kLoadsB = kTileK * kTileN / kThreads;     // 4 elements of B per thread per step
constexpr int kPad = 4;                                 // shared-memory row padding (keeps 16-byte alignment)

static_assert(kTileM == 16 * kSub && kTileN == 16 * kSub, "256 threads as 16 x 16, each 4 x 4 outputs");
static_assert(kLoadsA * kThreads == kTileM * kTileK && kLoadsB * kThreads == kTileK * kTileN, "even load split");

// The group owning output tile `tile`: the last g with problems[g].tile_start <= tile.
__device__ __forceinline__ int64_t find_group(const SaefastGemmProblem* __restrict__ problems, int64_t num_groups,
                                              int64_t tile) {
    int64_t lo = 0, hi = num_groups - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (problems[mid].tile_start <= tile) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Element e (0 <= e < 1024) of this thread's share of the A tile -> (row in tile, k in tile). Coalesced along k when
// A's k stride is 1 (a row-major A), along m otherwise.
__device__ __forceinline__ void a_coords(int e, bool k_fast, int& mm, int& kk) {
    if (k_fast) {
        kk = e % kTileK;
        mm = e / kTileK;
    } else {
        mm = e % kTileM;
        kk = e / kTileM;
    }
}

// Same for B: (k in tile, column in tile), coalesced along n when B's n stride is 1, along k otherwise.
__device__ __forceinline__ void b_coords(int e, bool n_fast, int& kk, int& nn) {
    if (n_fast) {
        nn = e % kTileN;
        kk = e / kTileN;
    } else {
        kk = e % kTileK;
        nn = e / kTileK;
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
grouped_mm_kernel(const SaefastGemmProblem* __restrict__ problems, int64_t num_groups, int64_t total_tiles) {
    __shared__ float As[kTileK][kTileM + kPad];  // As[p][i] = A[row0 + i, k0 + p]
    __shared__ float Bs[kTileK][kTileN + kPad];  // Bs[p][j] = B[k0 + p, col0 + j]

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;

    for (int64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        const SaefastGemmProblem p = problems[find_group(problems, num_groups, tile)];
        const int64_t local = tile - p.tile_start;
        const int64_t tiles_n = (p.n + kTileN - 1) / kTileN;
        const int64_t row0 = (local / tiles_n) * kTileM;
        const int64_t col0 = (local % tiles_n) * kTileN;
        const T* __restrict__ A = static_cast<const T*>(p.a);
        const T* __restrict__ B = static_cast<const T*>(p.b);
        T* __restrict__ C = static_cast<T*>(p.c);
        const bool a_k_fast = p.a_stride_k == 1;
        const bool b_n_fast = p.b_stride_n == 1;

        float acc[kSub][kSub];
#pragma unroll
        for (int i = 0; i < kSub; ++i) {
#pragma unroll
            for (int j = 0; j < kSub; ++j) acc[i][j] = 0.0f;
        }

        // Registers holding the next step's elements (prefetched from global memory during the current step).
        float a_reg[kLoadsA];
        float b_reg[kLoadsB];
        auto load_step = [&](int64_t k0) {
#pragma unroll
            for (int l = 0; l < kLoadsA; ++l) {
                int mm, kk;
                a_coords(tid + l * kThreads, a_k_fast, mm, kk);
                const int64_t gi = row0 + mm;
                const int64_t gp = k0 + kk;
                a_reg[l] = (gi < p.m && gp < p.k) ? to_float(A[gi * p.a_stride_m + gp * p.a_stride_k]) : 0.0f;
            }
#pragma unroll
            for (int l = 0; l < kLoadsB; ++l) {
                int kk, nn;
                b_coords(tid + l * kThreads, b_n_fast, kk, nn);
                const int64_t gp = k0 + kk;
                const int64_t gj = col0 + nn;
                b_reg[l] = (gp < p.k && gj < p.n) ? to_float(B[gp * p.b_stride_k + gj * p.b_stride_n]) : 0.0f;
            }
        };

        if (p.k > 0) load_step(0);
        for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
            // Stage the prefetched step in shared memory (the previous step's readers have passed the barrier at
            // the bottom of the loop).
#pragma unroll
            for (int l = 0; l < kLoadsA; ++l) {
                int mm, kk;
                a_coords(tid + l * kThreads, a_k_fast, mm, kk);
                As[kk][mm] = a_reg[l];
            }
#pragma unroll
            for (int l = 0; l < kLoadsB; ++l) {
                int kk, nn;
                b_coords(tid + l * kThreads, b_n_fast, kk, nn);
                Bs[kk][nn] = b_reg[l];
            }
            __syncthreads();
            if (k0 + kTileK < p.k) load_step(k0 + kTileK);  // overlaps the global loads with the FMAs below
#pragma unroll
            for (int kk = 0; kk < kTileK; ++kk) {
                float a[kSub], b[kSub];
#pragma unroll
                for (int i = 0; i < kSub; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < kSub; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < kSub; ++i) {
#pragma unroll
                    for (int j = 0; j < kSub; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                }
            }
            __syncthreads();
        }

#pragma unroll
        for (int i = 0; i < kSub; ++i) {
            const int64_t gi = row0 + ty + 16 * i;
            if (gi >= p.m) continue;
#pragma unroll
            for (int j = 0; j < kSub; ++j) {
                const int64_t gj = col0 + tx + 16 * j;
                if (gj < p.n) C[gi * p.c_stride_m + gj * p.c_stride_n] = from_float<T>(acc[i][j]);
            }
        }
    }
}

}  // namespace
}  // namespace saefast

extern "C" cudaError_t saefast_grouped_mm(const SaefastGemmProblem* problems, int64_t num_groups, int64_t total_tiles,
                                          int dtype, cudaStream_t stream) {
    using namespace saefast;
    if (!valid_dtype(dtype) || num_groups < 0 || total_tiles < 0) return cudaErrorInvalidValue;
    if (num_groups == 0 || total_tiles == 0) return cudaSuccess;
    if (problems == nullptr) return cudaErrorInvalidValue;
    const unsigned grid = static_cast<unsigned>(total_tiles < kMaxGridX ? total_tiles : kMaxGridX);
    dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        grouped_mm_kernel<T><<<grid, kThreads, 0, stream>>>(problems, num_groups, total_tiles);
    });
    return cudaGetLastError();
}
