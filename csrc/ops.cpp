// The op schemas, declared once. Each backend only registers kernels for them
// (gru_cpu.cpp for CPU, gru_cuda.cu for CUDA), so a CPU-only build still has every op.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(gru_fused, m) {
  m.def(gru_fused::kForwardSchema);
  m.def(gru_fused::kBackwardSchema);
}

// `import gru_fused._C` loads the library above; the module itself only reports how it
// was built.
static PyModuleDef gru_fused_module = {
    PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&gru_fused_module);
  if (m == nullptr) return nullptr;
#ifdef GRU_FUSED_WITH_CUDA
  PyModule_AddObject(m, "CUDA_COMPILED", Py_NewRef(Py_True));
#else
  PyModule_AddObject(m, "CUDA_COMPILED", Py_NewRef(Py_False));
#endif
  return m;
}
