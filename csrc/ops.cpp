// The saefast native extension: op schemas (TORCH_LIBRARY) and the Python module that loads them.
//
// Importing saefast._C registers these ops as torch.ops.saefast.*; the CPU kernels are in csrc/cpu/, the CUDA ones
// in csrc/cuda/ (torch-free .cu files, bound in csrc/cuda_bindings.cpp when torch has CUDA). Autograd formulas and
// fake (meta) implementations are registered from Python (saefast/native.py), next to the Triton ones.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/common.h"

TORCH_LIBRARY(saefast, m) {
  m.def("grouped_mm(Tensor[] a, Tensor[] b, bool trans_a, bool trans_b) -> Tensor[]");
  m.def("native_sparse_decode(Tensor values, Tensor indices, Tensor W_dec, Tensor alpha, Tensor? bias, "
        "Tensor? mask, bool per_member) -> Tensor");
  m.def("native_sparse_decode_grad_values(Tensor grad_out, Tensor indices, Tensor W_dec, Tensor alpha, "
        "Tensor? mask) -> Tensor");
  m.def("native_sparse_decode_grad_weight(Tensor grad_out, Tensor values, Tensor indices, int n_latents, "
        "Tensor alpha, Tensor? mask, bool deterministic) -> Tensor");
  m.def("native_sparse_decode_backward(Tensor grad_out, Tensor values, Tensor indices, Tensor W_dec, Tensor alpha, "
        "Tensor? mask) -> (Tensor, Tensor)");
  m.def("native_topk_encode(Tensor x, Tensor W_enc, Tensor bias, int k, Tensor? dead, int aux_k) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("native_threshold_encode(Tensor x, Tensor W_enc, Tensor bias, Tensor lower, int capacity) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("native_remove_parallel_grad_(Tensor W, Tensor(a!) grad) -> ()");
  m.def("native_sparse_sae_backward(Tensor x, Tensor b_dec, Tensor W_dec, Tensor values, Tensor indices, int split, "
        "Tensor grad_out, Tensor? aux_grad_out) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("native_adam_step_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float bias_correction1, float bias_correction2, "
        "bool unit_rows) -> ()");
  m.def("native_gather_rows_(Tensor[] sources, Tensor source_index, Tensor row_index, Tensor(a!) out) -> ()");
}

namespace {

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "saefast native ops (registered as torch.ops.saefast.*)";
  module.def("with_cuda", &with_cuda, "Whether the CUDA kernels were compiled in.");
  module.def("with_openmp", &with_openmp, "Whether the CPU kernels were compiled with OpenMP.");
  module.def("set_poison_outputs", [](bool on) { saefast::poison_outputs().store(on); },
             "Tests: fill op outputs with NaN / -1 before the kernels write them.");
}
