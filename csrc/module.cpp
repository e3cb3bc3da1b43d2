// module.cpp: makes the shared library importable as `fastvae._C`.
//
// The ops register themselves with the dispatcher (TORCH_LIBRARY) when the
// library loads; Python reaches them through torch.ops.fastvae, so the module
// itself exports nothing.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastvae fused ops (see torch.ops.fastvae)", -1, nullptr};
  return PyModule_Create(&module);
}
