// Host emulation of the CUDA execution model: just enough to run saefast's kernels on the CPU, for tests on
// machines without a GPU (see run.sh). NOT part of the extension build.
//
// transform.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` of a .cu file into
// `::emu::launch(grid, block, smem, stream, kernel, args)` and prepends `#include "emu.h"`; the result compiles
// with g++ against the CUDA toolkit headers (host-side half / bfloat16 conversions).
//
// Model: blocks run one after another; the threads of a block are cooperative fibers (ucontext) on one OS thread,
// switched only at barriers. __syncthreads() is a block barrier, __shfl_xor_sync a warp barrier around a shared
// exchange buffer; threads that have returned no longer count (as on the GPU). A barrier that can never complete
// (a divergent __syncthreads) aborts with a message. __shared__ variables become function statics (shared by the
// block's fibers, and safe because blocks do not overlap); atomicAdd is a plain add (one OS thread).
// What it cannot find: races between blocks, and some missing-barrier races (fibers only switch at barriers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>  // fiber switches announced to AddressSanitizer (ASAN=1 in run.sh)
#endif

#include <algorithm>
#include <cmath>  // fmaf (a device built-in under nvcc)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
    ucontext_t ctx;
    State state = kRunnable;
    std::vector<char> stack;
    void* fake_stack = nullptr;
};

inline std::vector<Fiber> fibers;
inline const void* main_stack_bottom = nullptr;  // the scheduler's stack, as AddressSanitizer reports it
inline size_t main_stack_size = 0;

// Announce a stack switch to AddressSanitizer (no-ops in a normal build). fake == nullptr: the current fiber ends.
inline void start_switch([[maybe_unused]] void** fake, [[maybe_unused]] const void* bottom,
                         [[maybe_unused]] size_t size) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(fake, bottom, size);
#endif
}
inline void finish_switch([[maybe_unused]] void* fake, [[maybe_unused]] const void** from_bottom,
                          [[maybe_unused]] size_t* from_size) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake, from_bottom, from_size);
#endif
}
inline ucontext_t scheduler;
inline int current = 0;
inline std::function<void()> body;
inline float exchange[1024];

inline void set_thread_index(int i) {
    threadIdx.x = i % blockDim.x;
    threadIdx.y = (i / blockDim.x) % blockDim.y;
    threadIdx.z = i / (blockDim.x * blockDim.y);
}

inline void fiber_main() {
    finish_switch(nullptr, &main_stack_bottom, &main_stack_size);
    body();
    fibers[current].state = kDone;
    start_switch(nullptr, main_stack_bottom, main_stack_size);
    swapcontext(&fibers[current].ctx, &scheduler);
}

inline void wait_at(State barrier) {
    Fiber& f = fibers[current];
    f.state = barrier;
    start_switch(&f.fake_stack, main_stack_bottom, main_stack_size);
    swapcontext(&f.ctx, &scheduler);
    finish_switch(f.fake_stack, &main_stack_bottom, &main_stack_size);
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emu: %s (block %u,%u,%u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z);
    std::abort();
}

inline void run_block() {
    const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
    if (static_cast<int>(fibers.size()) < n) fibers.resize(n);
    for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        if (f.stack.empty()) f.stack.resize(256 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
        f.state = kRunnable;
    }
    for (;;) {
        bool ran = false;
        for (int i = 0; i < n; ++i) {
            if (fibers[i].state != kRunnable) continue;
            current = i;
            set_thread_index(i);
            void* scheduler_fake_stack = nullptr;
            start_switch(&scheduler_fake_stack, fibers[i].stack.data(), fibers[i].stack.size());
            swapcontext(&scheduler, &fibers[i].ctx);
            finish_switch(scheduler_fake_stack, nullptr, nullptr);
            ran = true;
        }
        if (ran) continue;
        bool all_done = true;
        for (int i = 0; i < n; ++i) all_done &= fibers[i].state == kDone;
        if (all_done) return;
        // A warp barrier completes when every live thread of the warp waits at one.
        bool released = false;
        for (int w = 0; w * 32 < n; ++w) {
            const int lo = w * 32, hi = std::min(n, lo + 32);
            bool any = false, all = true;
            for (int i = lo; i < hi; ++i) {
                if (fibers[i].state == kDone) continue;
                any = true;
                all &= fibers[i].state == kAtWarpBarrier;
            }
            if (!any || !all) continue;
            for (int i = lo; i < hi; ++i) {
                if (fibers[i].state == kAtWarpBarrier) fibers[i].state = kRunnable;
            }
            released = true;
        }
        if (released) continue;
        // A block barrier completes when every live thread of the block waits at one.
        bool all_block = true;
        for (int i = 0; i < n; ++i) {
            if (fibers[i].state != kDone) all_block &= fibers[i].state == kAtBlockBarrier;
        }
        if (!all_block) fail("deadlock: threads wait at different barriers");
        for (int i = 0; i < n; ++i) {
            if (fibers[i].state == kAtBlockBarrier) fibers[i].state = kRunnable;
        }
    }
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t, cudaStream_t, Kernel kernel, Args... args) {
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) fail("bad block size");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) fail("bad grid size");
    gridDim = grid;
    blockDim = block;
    body = [&]() { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx.x = x;
                blockIdx.y = y;
                blockIdx.z = z;
                run_block();
            }
        }
    }
}

}  // namespace emu

inline void __syncthreads() { emu::wait_at(emu::kAtBlockBarrier); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const int t = emu::current;
    emu::exchange[t] = v;
    emu::wait_at(emu::kAtWarpBarrier);
    const float r = emu::exchange[(t & ~31) | ((t & 31) ^ lane_mask)];
    emu::wait_at(emu::kAtWarpBarrier);
    return r;
}

inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}

inline cudaError_t emu_get_last_error() { return cudaSuccess; }
#define cudaGetLastError emu_get_last_error
