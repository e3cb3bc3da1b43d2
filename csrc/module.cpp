// module.cpp: makes the shared library importable as `fastvae._C`.
//
// The ops register themselves with the dispatcher (TORCH_LIBRARY) when the
// library loads; Python reaches them through torch.ops.fastvae. The module
// itself exports one helper, draw_cpu_seed, for the Python wrapper's hot path.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/TransformationHelper.h>
#include <torch/csrc/Generator.h>

#include <mutex>

namespace {

// draw_cpu_seed(generator=None) -> int: the seed for one in-kernel Philox
// draw, taken from `generator` (torch's default CPU generator when None).
// It consumes and returns exactly what `torch.empty((), dtype=torch.int64)
// .random_(generator=generator)` would, without allocating a tensor or going
// through the dispatcher: for a (128, 32) latent layer that tensor round trip
// cost as much as the fused kernel.
PyObject* draw_cpu_seed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs > 1) {
    PyErr_SetString(PyExc_TypeError, "draw_cpu_seed(generator=None) takes at most one argument");
    return nullptr;
  }
  try {
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    if (nargs == 1 && args[0] != Py_None) {
      if (PyObject_IsInstance(args[0], THPGeneratorClass) != 1) {
        PyErr_SetString(PyExc_TypeError, "draw_cpu_seed: generator must be a torch.Generator or None");
        return nullptr;
      }
      generator = reinterpret_cast<THPGenerator*>(args[0])->cdata;
    }
    auto* cpu = at::check_generator<at::CPUGeneratorImpl>(generator);
    std::lock_guard<std::mutex> lock(generator.mutex());
    return PyLong_FromLongLong(at::transformation::uniform_int<int64_t>(cpu->random64()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"draw_cpu_seed", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&draw_cpu_seed)), METH_FASTCALL,
     "draw_cpu_seed(generator=None) -> int: a Philox seed drawn from a CPU torch.Generator"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastvae fused ops (see torch.ops.fastvae)", -1, methods};
  return PyModule_Create(&module);
}
