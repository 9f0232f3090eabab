// Schemas of every fastcurv op. Kernels live in cpu/ and cuda/; autograd and fake (meta)
// kernels are registered from Python (fastcurv/ops/), following pytorch/extension-cpp.
#include <Python.h>
#include <torch/library.h>

// An empty Python module so that `import fastcurv._C` loads this library (and with it the
// TORCH_LIBRARY registrations below) without needing pybind11.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastcurv, m) {
  // a: [B, T, d_in], delta: [B, T, d_out] -> [B] (fp32 for fp16/bf16 inputs)
  m.def("per_example_sqnorm(Tensor a, Tensor delta, bool bias) -> Tensor");
  m.def("per_example_sqnorm_backward(Tensor grad, Tensor a, Tensor delta, bool bias) -> (Tensor, Tensor)");
  // -> [B, B]
  m.def("per_example_gram(Tensor a, Tensor delta, bool bias) -> Tensor");
  m.def("per_example_gram_backward(Tensor grad, Tensor a, Tensor delta, bool bias) -> (Tensor, Tensor)");
}
