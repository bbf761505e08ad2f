// CUDA implementations of the saefast ops: TORCH_LIBRARY_IMPL(saefast, CUDA, ...).
//
// The schemas are defined once, in csrc/ops.cpp (TORCH_LIBRARY(saefast, m)); this file only registers CUDA kernels
// for them. It is compiled only when torch has CUDA (the build defines WITH_CUDA); without it the file is empty.
//
//   grouped_mm                         -> saefast_grouped_mm (csrc/cuda/grouped_mm.cu), one launch for all groups
//   native_sparse_decode               -> saefast_sparse_decode                   (csrc/cuda/sparse_decode.cu)
//   native_sparse_decode_grad_values   -> saefast_sparse_decode_grad_values
//   native_sparse_decode_grad_weight   -> saefast_sparse_decode_grad_weight_atomic, or (deterministic) a CSR built
//                                         here with a stable torch sort + saefast_sparse_decode_grad_weight_csr
//   native_topk_encode                 -> torch ops on row blocks of x (see topk_encode_cuda)
//   native_threshold_encode            -> torch ops on row blocks of x (see threshold_encode_cuda)
//
// Contracts: kernels/saefast_triton/sparse_decode.py, kernels/saefast_triton/sparse_decode_backward.py and
// kernels/saefast_triton/topk_encode.py (the Triton kernels' docstrings), whose validation this file mirrors with
// TORCH_CHECK (RuntimeError in Python) before any launch. As there, indices are not range-checked on the host (that
// would cost a device sync): the kernels treat an out-of-range index as a dropped slot.
//
// Only c10/cuda headers are used (stream, guard, error check), not ATen/cuda/CUDAContext.h, which pulls in the cuBLAS
// and cuSPARSE headers; c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream names.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/launchers.h"

namespace saefast {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------------------------------------
// Validation helpers
// ------------------------------------------------------------------------------------------------------------------

bool is_kernel_float(at::ScalarType t) {
    return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return SAEFAST_F32;
        case at::kBFloat16: return SAEFAST_BF16;
        case at::kHalf: return SAEFAST_F16;
        default: TORCH_CHECK(false, "saefast: unsupported float dtype ", t);
    }
    return SAEFAST_F32;  // unreachable
}

void check_float(const char* op, const char* name, const Tensor& t) {
    TORCH_CHECK(is_kernel_float(t.scalar_type()), op, ": ", name, " must be float32/bfloat16/float16; got ",
                t.scalar_type());
}

// Every defined tensor in `tensors` is a CUDA tensor on `device`.
void check_device(const char* op, const at::Device& device,
                  std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
    TORCH_CHECK(device.is_cuda(), op, ": the CUDA implementation needs CUDA tensors; got ", device);
    for (const auto& [name, t] : tensors) {
        if (t == nullptr || !t->defined()) continue;
        TORCH_CHECK(t->device() == device, op, ": all tensors must be on one device; ", name, " is on ", t->device(),
                    ", expected ", device);
    }
}

const Tensor* opt(const std::optional<Tensor>& t) { return t.has_value() ? &*t : nullptr; }

std::vector<int64_t> shape_of(const Tensor& t) { return t.sizes().vec(); }

// W_dec (or W_enc in the encoder backward) must be a contiguous float [J, M, D]: each slot gathers one row.
void check_weight(const char* op, const Tensor& W) {
    TORCH_CHECK(W.dim() == 3, op, ": W_dec must be [J, M, D]; got shape ", W.sizes());
    check_float(op, "W_dec", W);
    TORCH_CHECK(W.is_contiguous(), op, ": W_dec must be contiguous (each slot gathers one contiguous row)");
}

// The [N, J, K] slot tensors against J members (values may be undefined: grad_values does not read them).
void check_slots(const char* op, const Tensor* values, const Tensor& indices, const Tensor* mask, int64_t J) {
    TORCH_CHECK(indices.dim() == 3, op, ": indices must be [N, J, K]; got shape ", indices.sizes());
    TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64; got ", indices.scalar_type());
    TORCH_CHECK(indices.size(1) == J, op, ": indices have ", indices.size(1), " members but the weights have ", J);
    if (values != nullptr) {
        TORCH_CHECK(values->sizes() == indices.sizes(), op, ": values ", values->sizes(), " and indices ",
                    indices.sizes(), " differ in shape");
        check_float(op, "values", *values);
    }
    if (mask != nullptr) {
        TORCH_CHECK(mask->sizes() == indices.sizes(), op, ": mask ", mask->sizes(), " and indices ", indices.sizes(),
                    " differ in shape");
        TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool; got ", mask->scalar_type());
    }
}

// alpha as a contiguous fp32 [J] tensor (a copy only when it is not one already).
Tensor check_alpha(const char* op, const Tensor& alpha, int64_t J) {
    TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == J, op, ": alpha must be a [J] = [", J, "] tensor; got shape ",
                alpha.sizes());
    TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op, ": alpha must be a float tensor; got ",
                alpha.scalar_type());
    return alpha.to(at::kFloat).contiguous();
}

// grad_out is [N, D] (combined) or [N, J, D] (per member); returns per_member.
bool check_grad_out(const char* op, const Tensor& grad_out, int64_t N, int64_t J) {
    bool per_member = false;
    if (grad_out.dim() == 2 && grad_out.size(0) == N) {
        per_member = false;
    } else if (grad_out.dim() == 3 && grad_out.size(0) == N && grad_out.size(1) == J) {
        per_member = true;
    } else {
        TORCH_CHECK(false, op, ": grad_out must be [N, D] = [", N, ", D] or [N, J, D] = [", N, ", ", J,
                    ", D]; got shape ", grad_out.sizes());
    }
    check_float(op, "grad_out", grad_out);
    return per_member;
}

// ------------------------------------------------------------------------------------------------------------------
// Launcher arguments
// ------------------------------------------------------------------------------------------------------------------

SaefastSlots make_slots(const Tensor* values, const Tensor& indices, const Tensor* mask, int64_t M) {
    SaefastSlots s;
    std::memset(&s, 0, sizeof(s));
    if (values != nullptr) {
        s.values = values->data_ptr();
        s.values_dtype = dtype_code(values->scalar_type());
        s.v_stride_n = values->stride(0);
        s.v_stride_j = values->stride(1);
        s.v_stride_k = values->stride(2);
    }
    s.indices = indices.data_ptr<int64_t>();
    s.i_stride_n = indices.stride(0);
    s.i_stride_j = indices.stride(1);
    s.i_stride_k = indices.stride(2);
    if (mask != nullptr) {
        // torch.bool is one byte per element, 0 or 1: read as bytes (no copy).
        s.mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
        s.m_stride_n = mask->stride(0);
        s.m_stride_j = mask->stride(1);
        s.m_stride_k = mask->stride(2);
    }
    s.N = indices.size(0);
    s.J = indices.size(1);
    s.K = indices.size(2);
    s.M = M;
    return s;
}

SaefastGrad make_grad(const Tensor& grad_out, bool per_member) {
    SaefastGrad g;
    std::memset(&g, 0, sizeof(g));
    g.data = grad_out.data_ptr();
    g.dtype = dtype_code(grad_out.scalar_type());
    g.stride_n = grad_out.stride(0);
    g.stride_j = per_member ? grad_out.stride(1) : 0;  // one g row serves every member of a combined output
    g.stride_d = grad_out.stride(per_member ? 2 : 1);
    return g;
}

cudaStream_t current_stream(const at::Device& device) {
    return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// ------------------------------------------------------------------------------------------------------------------
// grouped_mm
// ------------------------------------------------------------------------------------------------------------------

// C_g = op(a_g) @ op(b_g) for every g, op = transpose when the flag is set; one kernel launch for all groups.
std::vector<Tensor> grouped_mm_cuda(at::TensorList a, at::TensorList b, bool trans_a, bool trans_b) {
    constexpr const char* op = "grouped_mm";
    TORCH_CHECK(a.size() == b.size(), op, ": got ", a.size(), " left operands and ", b.size(), " right ones");
    const int64_t G = static_cast<int64_t>(a.size());
    std::vector<Tensor> out;
    out.reserve(a.size());
    if (G == 0) return out;

    const at::ScalarType dtype = a[0].scalar_type();
    const at::Device device = a[0].device();
    TORCH_CHECK(device.is_cuda(), op, ": the CUDA implementation needs CUDA tensors; got ", device);
    TORCH_CHECK(is_kernel_float(dtype), op, ": operands must be float32/bfloat16/float16; got ", dtype);
    const c10::cuda::CUDAGuard guard(device);

    // Descriptors in pinned host memory, copied to the device asynchronously on the current stream (the caching host
    // allocator keeps the buffer alive until the copy has run).
    Tensor host = at::empty({G * static_cast<int64_t>(sizeof(SaefastGemmProblem))},
                            at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    auto* problems = reinterpret_cast<SaefastGemmProblem*>(host.data_ptr<uint8_t>());
    int64_t tiles = 0;
    for (int64_t g = 0; g < G; ++g) {
        const Tensor& A = a[g];
        const Tensor& B = b[g];
        TORCH_CHECK(A.dim() == 2 && B.dim() == 2, op, ": group ", g, ": operands must be 2-D; got shapes ",
                    A.sizes(), " and ", B.sizes());
        TORCH_CHECK(A.scalar_type() == dtype && B.scalar_type() == dtype, op, ": group ", g,
                    ": every operand must have dtype ", dtype, "; got ", A.scalar_type(), " and ", B.scalar_type());
        TORCH_CHECK(A.device() == device && B.device() == device, op, ": group ", g,
                    ": every operand must be on ", device, "; got ", A.device(), " and ", B.device());
        // op(A)[i, p] and op(B)[p, j] as (sizes, strides): a transpose swaps them, no copy.
        const int ai = trans_a ? 1 : 0, ap = trans_a ? 0 : 1;
        const int bp = trans_b ? 1 : 0, bj = trans_b ? 0 : 1;
        const int64_t m = A.size(ai), k = A.size(ap), n = B.size(bj);
        TORCH_CHECK(B.size(bp) == k, op, ": group ", g, ": op(a) is ", m, " x ", k, " but op(b) is ", B.size(bp),
                    " x ", n, " (trans_a=", trans_a ? "True" : "False", ", trans_b=", trans_b ? "True" : "False", ")");
        Tensor C = at::empty({m, n}, A.options());
        SaefastGemmProblem& p = problems[g];
        std::memset(&p, 0, sizeof(p));
        p.a = A.data_ptr();
        p.b = B.data_ptr();
        p.c = C.data_ptr();
        p.m = m;
        p.n = n;
        p.k = k;
        p.a_stride_m = A.stride(ai);
        p.a_stride_k = A.stride(ap);
        p.b_stride_k = B.stride(bp);
        p.b_stride_n = B.stride(bj);
        p.c_stride_m = C.stride(0);
        p.c_stride_n = C.stride(1);
        p.tile_start = tiles;
        tiles += saefast_gemm_tiles(m, n);
        out.push_back(std::move(C));
    }
    if (tiles == 0) return out;  // every output is empty
    Tensor dev = at::empty_like(host, at::TensorOptions().device(device).pinned_memory(false));
    dev.copy_(host, /*non_blocking=*/true);
    C10_CUDA_CHECK(saefast_grouped_mm(reinterpret_cast<const SaefastGemmProblem*>(dev.data_ptr<uint8_t>()), G, tiles,
                                      dtype_code(dtype), current_stream(device)));
    return out;
}

// ------------------------------------------------------------------------------------------------------------------
// Sparse decode and its backward
// ------------------------------------------------------------------------------------------------------------------

Tensor sparse_decode_cuda(const Tensor& values, const Tensor& indices, const Tensor& W_dec, const Tensor& alpha,
                          const std::optional<Tensor>& bias_opt, const std::optional<Tensor>& mask, bool per_member) {
    constexpr const char* op = "native_sparse_decode";
    check_weight(op, W_dec);
    const int64_t J = W_dec.size(0), M = W_dec.size(1), D = W_dec.size(2);
    check_device(op, W_dec.device(), {{"values", &values}, {"indices", &indices}, {"W_dec", &W_dec},
                                      {"alpha", &alpha}, {"bias", opt(bias_opt)}, {"mask", opt(mask)}});
    check_slots(op, &values, indices, opt(mask), J);
    const c10::cuda::CUDAGuard guard(W_dec.device());
    const Tensor alpha32 = check_alpha(op, alpha, J);
    Tensor bias;
    if (bias_opt.has_value()) {
        const std::vector<int64_t> expected = per_member ? std::vector<int64_t>{J, D} : std::vector<int64_t>{D};
        TORCH_CHECK(shape_of(*bias_opt) == expected, op, ": bias must be ", at::IntArrayRef(expected),
                    " (per_member=", per_member ? "True" : "False", "); got shape ", bias_opt->sizes());
        check_float(op, "bias", *bias_opt);
        bias = bias_opt->contiguous();
    }
    TORCH_CHECK(D <= SAEFAST_SPARSE_MAX_D, op, ": D = ", D, " exceeds the kernel's limit ", SAEFAST_SPARSE_MAX_D);
    TORCH_CHECK(!per_member || J <= SAEFAST_SPARSE_MAX_J_PER_MEMBER, op, ": per_member with J = ", J,
                " exceeds the kernel's limit ", SAEFAST_SPARSE_MAX_J_PER_MEMBER);
    const int64_t N = indices.size(0);
    Tensor out = per_member ? at::empty({N, J, D}, W_dec.options()) : at::empty({N, D}, W_dec.options());
    if (out.numel() == 0) return out;
    const SaefastSlots slots = make_slots(&values, indices, opt(mask), M);
    C10_CUDA_CHECK(saefast_sparse_decode(slots, W_dec.data_ptr(), dtype_code(W_dec.scalar_type()), D,
                                         alpha32.data_ptr<float>(), bias.defined() ? bias.data_ptr() : nullptr,
                                         bias.defined() ? dtype_code(bias.scalar_type()) : SAEFAST_F32,
                                         out.data_ptr(), dtype_code(out.scalar_type()), per_member ? 1 : 0,
                                         current_stream(W_dec.device())));
    return out;
}

Tensor sparse_decode_grad_values_cuda(const Tensor& grad_out, const Tensor& indices, const Tensor& W_dec,
                                      const Tensor& alpha, const std::optional<Tensor>& mask) {
    constexpr const char* op = "native_sparse_decode_grad_values";
    check_weight(op, W_dec);
    const int64_t J = W_dec.size(0), M = W_dec.size(1), D = W_dec.size(2);
    check_device(op, W_dec.device(), {{"grad_out", &grad_out}, {"indices", &indices}, {"W_dec", &W_dec},
                                      {"alpha", &alpha}, {"mask", opt(mask)}});
    check_slots(op, nullptr, indices, opt(mask), J);
    const int64_t N = indices.size(0), K = indices.size(2);
    const bool per_member = check_grad_out(op, grad_out, N, J);
    TORCH_CHECK(grad_out.size(-1) == D, op, ": grad_out has width ", grad_out.size(-1), " but W_dec rows have ", D);
    const c10::cuda::CUDAGuard guard(W_dec.device());
    const Tensor alpha32 = check_alpha(op, alpha, J);
    Tensor out = at::empty({N, J, K}, W_dec.options().dtype(at::kFloat));
    if (out.numel() == 0) return out;
    C10_CUDA_CHECK(saefast_sparse_decode_grad_values(make_grad(grad_out, per_member),
                                                     make_slots(nullptr, indices, opt(mask), M), W_dec.data_ptr(),
                                                     dtype_code(W_dec.scalar_type()), D, alpha32.data_ptr<float>(),
                                                     out.data_ptr<float>(), current_stream(W_dec.device())));
    return out;
}

// CSR segmentation of the slots by latent, for the deterministic grad_weight: returns (row_ptr int64 [J*M + 1],
// slot_ids int64 [N*J*K]). The key of a slot is j * M + index, flattened in (n, j, k) order, so a slot's position in
// the flat list is its id n * J * K + j * K + k; dropped and out-of-range slots get the key J * M, which sorts after
// every row and is never read. A stable sort keeps the slots of a row in ascending id order; row r spans
// slot_ids[row_ptr[r] : row_ptr[r + 1]]. Extra memory: N*J*K int64 keys and permutation. Torch ops only (any device).
std::tuple<Tensor, Tensor> build_csr(const Tensor& indices, const std::optional<Tensor>& mask, int64_t M) {
    const int64_t J = indices.size(1);
    const Tensor member = at::arange(J, indices.options()).view({1, J, 1});
    Tensor keep = indices.ge(0).logical_and_(indices.lt(M));
    if (mask.has_value()) keep.logical_and_(*mask);
    const Tensor keys = at::where(keep, indices + member * M, J * M).reshape(-1);
    auto [sorted_keys, slot_ids] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    Tensor row_ptr = at::searchsorted(sorted_keys, at::arange(J * M + 1, indices.options()));
    return {row_ptr, slot_ids};
}

Tensor sparse_decode_grad_weight_cuda(const Tensor& grad_out, const Tensor& values, const Tensor& indices,
                                      int64_t n_latents, const Tensor& alpha, const std::optional<Tensor>& mask,
                                      bool deterministic) {
    constexpr const char* op = "native_sparse_decode_grad_weight";
    TORCH_CHECK(n_latents >= 0, op, ": n_latents must be a non-negative int; got ", n_latents);
    TORCH_CHECK(indices.dim() == 3, op, ": indices must be [N, J, K]; got shape ", indices.sizes());
    const int64_t M = n_latents;
    const int64_t N = indices.size(0), J = indices.size(1), K = indices.size(2);
    check_device(op, indices.device(), {{"grad_out", &grad_out}, {"values", &values}, {"indices", &indices},
                                        {"alpha", &alpha}, {"mask", opt(mask)}});
    check_slots(op, &values, indices, opt(mask), J);
    const bool per_member = check_grad_out(op, grad_out, N, J);
    const int64_t D = grad_out.size(-1);
    const c10::cuda::CUDAGuard guard(indices.device());
    const Tensor alpha32 = check_alpha(op, alpha, J);
    const cudaStream_t stream = current_stream(indices.device());
    const at::TensorOptions f32 = indices.options().dtype(at::kFloat);

    if (!deterministic) {
        Tensor dW = at::zeros({J, M, D}, f32);  // the atomics accumulate into zeros
        if (N * J * K == 0 || dW.numel() == 0) return dW;
        C10_CUDA_CHECK(saefast_sparse_decode_grad_weight_atomic(make_grad(grad_out, per_member),
                                                                make_slots(&values, indices, opt(mask), M), D,
                                                                alpha32.data_ptr<float>(), dW.data_ptr<float>(),
                                                                stream));
        return dW;
    }

    TORCH_CHECK(D <= SAEFAST_SPARSE_MAX_D, op, ": D = ", D, " exceeds the kernel's limit ", SAEFAST_SPARSE_MAX_D);
    Tensor dW = at::empty({J, M, D}, f32);  // every element is written by the kernel
    if (dW.numel() == 0) return dW;
    const auto [row_ptr, slot_ids] = build_csr(indices, mask, M);
    C10_CUDA_CHECK(saefast_sparse_decode_grad_weight_csr(make_grad(grad_out, per_member),
                                                         make_slots(&values, indices, opt(mask), M), D,
                                                         alpha32.data_ptr<float>(), row_ptr.data_ptr<int64_t>(),
                                                         slot_ids.data_ptr<int64_t>(), dW.data_ptr<float>(), stream));
    return dW;
}

// ------------------------------------------------------------------------------------------------------------------
// Encoders: torch ops on row blocks of x, so the N x J*M pre-activations never exist at once
// ------------------------------------------------------------------------------------------------------------------

// Working set of one block, about (bytes per pre-activation entry) x rows x J*M; rows are chosen to keep it near this.
constexpr int64_t kEncodeBlockBytes = int64_t(256) << 20;

struct EncoderShape {
    int64_t N, D, J, M;
};

// x [N, D], W_enc [J, M, D] (same float dtype), bias [J, M] fp32, 1 <= k <= M, one CUDA device (the checks of
// kernels/saefast_triton/topk_encode.py::_check_encoder).
EncoderShape check_encoder(const char* op, const Tensor& x, const Tensor& W_enc, const Tensor& bias,
                           const char* k_name, int64_t k) {
    TORCH_CHECK(x.dim() == 2, op, ": x must be [N, D]; got shape ", x.sizes());
    TORCH_CHECK(W_enc.dim() == 3, op, ": W_enc must be [J, M, D]; got shape ", W_enc.sizes());
    const EncoderShape s{x.size(0), x.size(1), W_enc.size(0), W_enc.size(1)};
    TORCH_CHECK(W_enc.size(2) == s.D, op, ": x is [N, D=", s.D, "] but W_enc is [J, M, D=", W_enc.size(2), "]");
    TORCH_CHECK(s.J >= 1 && s.M >= 1, op, ": W_enc needs J >= 1 members of M >= 1 latents; got shape ",
                W_enc.sizes());
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == s.J && bias.size(1) == s.M, op, ": bias must be [J, M] = [", s.J,
                ", ", s.M, "]; got shape ", bias.sizes());
    check_float(op, "x", x);
    TORCH_CHECK(W_enc.scalar_type() == x.scalar_type(), op, ": W_enc dtype ", W_enc.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(bias.scalar_type() == at::kFloat, op,
                ": bias must be float32 (it is added to the fp32 accumulator); got ", bias.scalar_type());
    TORCH_CHECK(1 <= k && k <= s.M, op, ": ", k_name, " must be an int with 1 <= ", k_name, " <= M = ", s.M,
                "; got ", k);
    check_device(op, x.device(), {{"x", &x}, {"W_enc", &W_enc}, {"bias", &bias}});
    return s;
}

// Rows of x per block: the block's working set (bytes_per_entry per pre-activation entry) at most kEncodeBlockBytes,
// and at least one row.
int64_t block_rows(const EncoderShape& s, int64_t bytes_per_entry) {
    const int64_t per_row = std::max<int64_t>(1, s.J * s.M * bytes_per_entry);
    return std::max<int64_t>(1, std::min<int64_t>(s.N, kEncodeBlockBytes / per_row));
}

// fp32 pre-activations [rows, J, M] = x_block @ W_flat^T + bias. W_flat = W_enc viewed as [J*M, D]. fp32 inputs run
// through at::addmm (exact fp32 unless torch.backends.cuda.matmul.allow_tf32 is set); bf16 / fp16 inputs through
// the fp32-output matmul (fp32 accumulation, no rounding of the products' sum to the input dtype).
Tensor pre_block(const Tensor& x_block, const Tensor& W_flat, const Tensor& bias_flat, const EncoderShape& s) {
    Tensor pre;
    if (x_block.scalar_type() == at::kFloat) {
        pre = at::addmm(bias_flat, x_block, W_flat.t());
    } else {
        pre = at::mm(x_block, W_flat.t(), at::kFloat).add_(bias_flat);
    }
    return pre.view({x_block.size(0), s.J, s.M});
}

// int64 keys ordered like (pre-activation, -latent): the order-preserving int32 image of the fp32 bits in the high
// half, 2^31 - 1 - latent in the low half. Keys are distinct, so a top-k of keys has no ties: among equal values the
// lower latent ranks first, and -0.0 ranks just below +0.0 (the rule of the Triton kernel).
Tensor order_keys(const Tensor& pre, const Tensor& low) {
    Tensor bits = pre.view(at::kInt).to(at::kLong);  // sign-extended fp32 bits
    // Negative floats order backwards as signed ints: flipping their 31 low bits makes the map monotone.
    bits = at::where(bits.lt(0), bits.bitwise_xor(int64_t(0x7FFFFFFF)), bits);
    return bits.mul_(int64_t(1) << 32).add_(low);  // |high| <= 2^31: no overflow
}

// The top-k encode on row blocks of x (torch ops, any device; inputs already validated): see topk_encode_cuda.
std::tuple<Tensor, Tensor, Tensor, Tensor> topk_encode_blocks(const Tensor& x, const Tensor& W_enc, const Tensor& bias,
                                                              int64_t k, const std::optional<Tensor>& dead,
                                                              int64_t aux_k, const EncoderShape& s) {
    const bool has_aux = dead.has_value() && aux_k > 0;
    const int64_t a = dead.has_value() ? aux_k : 0;  // no AuxK: empty [N, J, 0] outputs (as saefast.ops does)
    const at::TensorOptions f32 = x.options().dtype(at::kFloat), i64 = x.options().dtype(at::kLong);
    Tensor values = at::empty({s.N, s.J, k}, f32), indices = at::empty({s.N, s.J, k}, i64);
    Tensor aux_values = at::empty({s.N, s.J, a}, f32), aux_indices = at::empty({s.N, s.J, a}, i64);
    if (s.N == 0) return {values, indices, aux_values, aux_indices};

    const Tensor W_flat = W_enc.reshape({s.J * s.M, s.D});
    const Tensor bias_flat = bias.reshape({s.J * s.M});
    const Tensor low = at::arange(s.M, i64).neg_().add_(int64_t(0x7FFFFFFF));  // 2^31 - 1 - latent
    const Tensor not_dead = has_aux ? dead->logical_not().unsqueeze(0) : Tensor();
    const int64_t pad = std::numeric_limits<int64_t>::min();  // loses to every real key (NaN is not supported)
    // Per entry: pre (4) + keys and their temporaries (~20) [+ aux keys (8)] bytes.
    const int64_t rows = block_rows(s, has_aux ? 40 : 32);
    for (int64_t n0 = 0; n0 < s.N; n0 += rows) {
        const int64_t nb = std::min(rows, s.N - n0);
        const Tensor pre = pre_block(x.narrow(0, n0, nb), W_flat, bias_flat, s);
        const Tensor keys = order_keys(pre, low);
        const auto [top_keys, top_idx] = at::topk(keys, k, /*dim=*/-1, /*largest=*/true, /*sorted=*/true);
        values.narrow(0, n0, nb).copy_(pre.gather(-1, top_idx));
        indices.narrow(0, n0, nb).copy_(top_idx);
        if (has_aux) {
            // Non-dead latents get the padding key; slots beyond a member's dead count hold it: value -inf, index 0.
            const Tensor aux_keys = keys.masked_fill(not_dead, pad);
            const auto [aux_top, aux_idx] = at::topk(aux_keys, aux_k, -1, true, true);
            const Tensor is_pad = aux_top.eq(pad);
            aux_values.narrow(0, n0, nb)
                .copy_(pre.gather(-1, aux_idx).masked_fill_(is_pad, -std::numeric_limits<float>::infinity()));
            aux_indices.narrow(0, n0, nb).copy_(aux_idx.masked_fill(is_pad, 0));
        }
    }
    return {values, indices, aux_values, aux_indices};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> topk_encode_cuda(const Tensor& x, const Tensor& W_enc, const Tensor& bias,
                                                            int64_t k, const std::optional<Tensor>& dead,
                                                            int64_t aux_k) {
    constexpr const char* op = "native_topk_encode";
    const EncoderShape s = check_encoder(op, x, W_enc, bias, "k", k);
    TORCH_CHECK(0 <= aux_k && aux_k <= s.M, op, ": aux_k must be an int with 0 <= aux_k <= M = ", s.M, "; got ",
                aux_k);
    TORCH_CHECK(aux_k == 0 || dead.has_value(), op, ": aux_k > 0 needs the dead-latent mask dead [J, M]");
    if (dead.has_value()) {
        TORCH_CHECK(dead->scalar_type() == at::kBool && dead->dim() == 2 && dead->size(0) == s.J &&
                        dead->size(1) == s.M,
                    op, ": dead must be a bool tensor [J, M] = [", s.J, ", ", s.M, "]; got ", dead->scalar_type(), " ",
                    dead->sizes());
        check_device(op, x.device(), {{"dead", &*dead}});
    }
    const c10::cuda::CUDAGuard guard(x.device());
    return topk_encode_blocks(x, W_enc, bias, k, dead, aux_k, s);
}

// The threshold encode on row blocks of x (torch ops, any device; inputs already validated): see
// threshold_encode_cuda.
std::tuple<Tensor, Tensor, Tensor, Tensor> threshold_encode_blocks(const Tensor& x, const Tensor& W_enc,
                                                                   const Tensor& bias, const Tensor& lower,
                                                                   int64_t capacity, const EncoderShape& s) {
    const at::TensorOptions f32 = x.options().dtype(at::kFloat), i64 = x.options().dtype(at::kLong);
    Tensor values = at::empty({s.N, s.J, capacity}, f32), indices = at::empty({s.N, s.J, capacity}, i64);
    Tensor counts = at::empty({s.N, s.J}, i64);
    if (s.N == 0) return {values, indices, counts, at::zeros({}, x.options().dtype(at::kBool))};

    const Tensor W_flat = W_enc.reshape({s.J * s.M, s.D});
    const Tensor bias_flat = bias.reshape({s.J * s.M});
    // Score of a kept latent m: M - m (> 0, larger for lower m); 0 for the others. The top `capacity` scores, sorted,
    // are the kept latents in ascending order, then (score 0) padding slots.
    const Tensor rank = at::arange(s.M, x.options().dtype(at::kInt)).neg_().add_(s.M);
    const Tensor zero = at::zeros({}, x.options().dtype(at::kInt));
    // Per entry: pre (4) + keep (1) + scores (4) + temporaries.
    const int64_t rows = block_rows(s, 16);
    for (int64_t n0 = 0; n0 < s.N; n0 += rows) {
        const int64_t nb = std::min(rows, s.N - n0);
        const Tensor pre = pre_block(x.narrow(0, n0, nb), W_flat, bias_flat, s);
        const Tensor keep = pre.gt(lower);  // [nb, J, M]; lower broadcasts over the rows
        counts.narrow(0, n0, nb).copy_(keep.sum(-1));
        const Tensor score = at::where(keep, rank, zero);
        const auto [top_score, top_idx] = at::topk(score, capacity, /*dim=*/-1, /*largest=*/true, /*sorted=*/true);
        // Padding slots (count <= slot < capacity): value 0, index 0, the SparseCodes convention.
        const Tensor is_pad = top_score.le(0);
        values.narrow(0, n0, nb).copy_(pre.gather(-1, top_idx).masked_fill_(is_pad, 0.0));
        indices.narrow(0, n0, nb).copy_(top_idx.masked_fill(is_pad, 0));
    }
    const Tensor overflow = counts.gt(capacity).any();  // no host sync: the caller decides what to do
    return {values, indices, counts, overflow};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> threshold_encode_cuda(const Tensor& x, const Tensor& W_enc,
                                                                 const Tensor& bias, const Tensor& lower,
                                                                 int64_t capacity) {
    constexpr const char* op = "native_threshold_encode";
    const EncoderShape s = check_encoder(op, x, W_enc, bias, "capacity", capacity);
    TORCH_CHECK(lower.scalar_type() == at::kFloat && lower.dim() == 2 && lower.size(0) == s.J &&
                    lower.size(1) == s.M,
                op, ": lower must be a float32 tensor [J, M] = [", s.J, ", ", s.M, "]; got ", lower.scalar_type(), " ",
                lower.sizes());
    check_device(op, x.device(), {{"lower", &lower}});
    const c10::cuda::CUDAGuard guard(x.device());
    return threshold_encode_blocks(x, W_enc, bias, lower, capacity, s);
}

}  // namespace
}  // namespace saefast

TORCH_LIBRARY_IMPL(saefast, CUDA, m) {
    m.impl("grouped_mm", &saefast::grouped_mm_cuda);
    m.impl("native_sparse_decode", &saefast::sparse_decode_cuda);
    m.impl("native_sparse_decode_grad_values", &saefast::sparse_decode_grad_values_cuda);
    m.impl("native_sparse_decode_grad_weight", &saefast::sparse_decode_grad_weight_cuda);
    m.impl("native_topk_encode", &saefast::topk_encode_cuda);
    m.impl("native_threshold_encode", &saefast::threshold_encode_cuda);
}

#endif  // WITH_CUDA
