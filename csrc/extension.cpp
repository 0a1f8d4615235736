// Makes the shared library importable as the Python module fsmtl_kernels._C. Importing it runs the
// TORCH_LIBRARY_IMPL(fsmtl, CPU, m) registrations of csrc/<op>.cpp, which attach the CPU kernels to
// the torch.ops.fsmtl.<op> schemas defined once in Python (fsmtl_kernels/<op>.py).
#include <Python.h>

// A module with no Python attributes: the ops live in torch.ops.fsmtl.
#define FSMTL_CONCAT_(a, b) a##b
#define FSMTL_CONCAT(a, b) FSMTL_CONCAT_(a, b)

static PyModuleDef fsmtl_module = {PyModuleDef_HEAD_INIT, "_C", "fsmtl_kernels C++/OpenMP CPU kernels (torch.ops.fsmtl)",
                                   -1, nullptr};

PyMODINIT_FUNC FSMTL_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&fsmtl_module); }
