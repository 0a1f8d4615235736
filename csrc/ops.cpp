// Registers the CPU kernels as torch.library ops in the `fsmtl` namespace (called from Python as
// torch.ops.fsmtl.*), and makes the shared library importable as the Python module
// fsmtl_kernels._C: importing it runs the registrations below.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

namespace fsmtl {
void fisher_accumulate_cpu(at::TensorList fisher, at::TensorList grads, double scale, bool per_sample);
at::Tensor topk_mask_cpu(at::TensorList scores, at::IntArrayRef ks);
void masked_grad_average_cpu(at::TensorList grads, const at::Tensor& words, at::IntArrayRef word_offsets,
                             bool selected, at::TensorList out);
}  // namespace fsmtl

TORCH_LIBRARY(fsmtl, m) {
  m.def("fisher_accumulate(Tensor(a!)[] fisher, Tensor[] grads, float scale, bool per_sample) -> ()");
  m.def("topk_mask(Tensor[] scores, int[] ks) -> Tensor");
  m.def(
      "masked_grad_average(Tensor[] grads, Tensor words, int[] word_offsets, bool selected, Tensor(a!)[] out) -> ()");
}

TORCH_LIBRARY_IMPL(fsmtl, CPU, m) {
  m.impl("fisher_accumulate", &fsmtl::fisher_accumulate_cpu);
  m.impl("topk_mask", &fsmtl::topk_mask_cpu);
  m.impl("masked_grad_average", &fsmtl::masked_grad_average_cpu);
}

// A module with no Python attributes: the ops live in torch.ops.fsmtl.
#define FSMTL_CONCAT_(a, b) a##b
#define FSMTL_CONCAT(a, b) FSMTL_CONCAT_(a, b)

static PyModuleDef fsmtl_module = {PyModuleDef_HEAD_INIT, "_C", "fsmtl_kernels C++/OpenMP CPU ops (torch.ops.fsmtl)",
                                   -1, nullptr};

PyMODINIT_FUNC FSMTL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fsmtl_module); }
