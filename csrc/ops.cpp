// The op schemas, declared once. Each backend only registers kernels for them
// (gru_cpu.cpp for CPU, gru_cuda.cu for CUDA), so a CPU-only build still has every op.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gru_fused, m) {
  // One layer, one direction. Returns (output [T, B, H], h_n [B, H], workspace
  // [4, T, B, H]); the workspace holds what gru_backward needs and nothing else.
  m.def(
      "gru_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, Tensor? lengths, bool reset_after, bool reverse) "
      "-> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias_ih,
  // grad_bias_hh); an entry whose output_mask is false (or a bias grad when has_bias is
  // false) is an empty tensor of shape [0] and costs nothing.
  m.def(
      "gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor workspace, bool has_bias, "
      "bool reset_after, bool reverse, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
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
