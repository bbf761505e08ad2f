// Device-side helpers shared by the saefast .cu files: fp32 / bf16 / fp16 loads and stores as fp32, and dispatch of
// a SaefastDtype code to a storage type. No torch: only the CUDA toolkit's half / bfloat16 headers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace saefast {

// Storage type -> fp32 (exact for every storage type).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// fp32 -> storage type, rounded to nearest even (the single rounding of an output).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Element i of a float tensor of runtime dtype `dtype`, as fp32. For operands read once per slot or per block
// (values, bias), where a uniform branch costs nothing; hot loops use a template storage type instead.
__device__ __forceinline__ float load_as_float(const void* p, int64_t i, int dtype) {
    switch (dtype) {
        case SAEFAST_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        case SAEFAST_F16: return __half2float(static_cast<const __half*>(p)[i]);
        default: return static_cast<const float*>(p)[i];
    }
}

// Store fp32 x as element i of a float tensor of runtime dtype `dtype`.
__device__ __forceinline__ void store_from_float(void* p, int64_t i, int dtype, float x) {
    switch (dtype) {
        case SAEFAST_BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
        case SAEFAST_F16: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
        default: static_cast<float*>(p)[i] = x; break;
    }
}

inline bool valid_dtype(int dtype) { return dtype == SAEFAST_F32 || dtype == SAEFAST_BF16 || dtype == SAEFAST_F16; }

// Calls f(T{}) with T the storage type of `dtype` (float / __nv_bfloat16 / __half); false for an unknown code.
template <typename F>
inline bool dispatch_dtype(int dtype, F&& f) {
    switch (dtype) {
        case SAEFAST_F32: f(float{}); return true;
        case SAEFAST_BF16: f(__nv_bfloat16{}); return true;
        case SAEFAST_F16: f(__half{}); return true;
        default: return false;
    }
}

// Largest grid dimensions (x: 2^31 - 1, y and z: 65535).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace saefast
