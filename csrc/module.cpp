// module.cpp: makes the shared library importable as `fastvae._C`.
//
// The ops register themselves with the dispatcher (TORCH_LIBRARY) when the
// library loads; Python reaches them through torch.ops.fastvae. The module
// adds two helpers for fastvae.ops.latent_terms' most common call (CPU
// tensors, eager mode, in-kernel noise), where a (128, 32) latent layer's
// whole fused forward costs less than a few Python-level steps:
//   draw_cpu_seed(generator=None) -> int
//   latent_terms_cpu_seed(mu, logvar, num_samples, generator, row_offset, stl) -> (z, kl, log_q, log_p)
// cpu_level() -> str, the x86-64 level the float32 CPU loops run at (csrc/cpu/cpu_level.h),
// and fused_likelihoods() -> tuple[str, ...], the kName of every fused likelihood
// (csrc/fastvae.h), which fastvae.ops checks its own list against.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/python_numbers.h>

#include "cpu/seed.h"

#include "cpu/cpu_level.h"
#include "fastvae.h"

namespace {

// The generator argument: torch's default CPU generator for None.
at::Generator generator_arg(PyObject* arg, const char* function) {
  if (arg == Py_None) return at::detail::getDefaultCPUGenerator();
  TORCH_CHECK_TYPE(PyObject_IsInstance(arg, THPGeneratorClass) == 1, "fastvae: ", function,
                   ": generator must be a torch.Generator or None, got ", Py_TYPE(arg)->tp_name);
  return reinterpret_cast<THPGenerator*>(arg)->cdata;
}

// One seed for the in-kernel Philox stream (cpu/seed.h).
int64_t draw_seed(const at::Generator& generator) { return fastvae::cpu::draw_cpu_seed(generator); }

PyObject* draw_cpu_seed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs <= 1, "fastvae: draw_cpu_seed(generator=None) takes at most one argument");
  return PyLong_FromLongLong(draw_seed(generator_arg(nargs == 1 ? args[0] : Py_None, "draw_cpu_seed")));
  END_HANDLE_TH_ERRORS
}

// fastvae::latent_terms with a seed from draw_seed, called through the
// dispatcher (autograd included) as torch.ops would, minus the boxing of its
// arguments. The Python caller sends only plain CPU tensors in eager mode, with
// no __torch_function__ mode active, so nothing torch.ops does is skipped.
PyObject* latent_terms_cpu_seed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6, "fastvae: latent_terms_cpu_seed takes 6 arguments, got ", nargs);
  TORCH_CHECK_TYPE(THPVariable_Check(args[0]) && THPVariable_Check(args[1]),
                   "fastvae: latent_terms_cpu_seed: mu and logvar must be tensors");
  const at::Tensor& mu = THPVariable_Unpack(args[0]);
  const at::Tensor& logvar = THPVariable_Unpack(args[1]);
  c10::optional<int64_t> num_samples;
  if (args[2] != Py_None) num_samples = THPUtils_unpackLong(args[2]);
  at::Generator generator = generator_arg(args[3], "latent_terms");
  const int64_t row_offset = THPUtils_unpackLong(args[4]);
  const int stl = PyObject_IsTrue(args[5]);
  if (stl < 0) return nullptr;
  // Drawn last, so that an argument rejected above leaves the generator's state alone.
  const int64_t seed = draw_seed(generator);

  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, c10::optional<int64_t>, int64_t,
      int64_t, int64_t, bool);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastvae::latent_terms", "").typed<Signature>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops does: other Python threads run meanwhile
    out = op.call(mu, logvar, c10::nullopt, num_samples, seed, /*offset=*/0, row_offset, stl == 1);
  }
  PyObject* result = PyTuple_New(4);
  if (result == nullptr) return nullptr;
  auto& [z, kl, log_q, log_p] = out;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(z)));  // SET_ITEM takes the new references
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(kl)));
  PyTuple_SET_ITEM(result, 2, THPVariable_Wrap(std::move(log_q)));
  PyTuple_SET_ITEM(result, 3, THPVariable_Wrap(std::move(log_p)));
  return result;
  END_HANDLE_TH_ERRORS
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

PyObject* cpu_level(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(fastvae::cpu::cpu_level_name(fastvae::cpu::cpu_level()));
  END_HANDLE_TH_ERRORS
}

PyObject* fused_likelihoods(PyObject* /*module*/, PyObject* /*unused*/) {
  HANDLE_TH_ERRORS
  PyObject* names = PyList_New(0);
  if (names == nullptr) return nullptr;
  fastvae::for_each_likelihood(fastvae::FusedLikelihoods{}, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    PyObject* name = PyUnicode_FromString(D::kName);
    if (name != nullptr) PyList_Append(names, name);
    Py_XDECREF(name);
  });
  PyObject* result = PyList_AsTuple(names);
  Py_DECREF(names);
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"draw_cpu_seed", fastcall<draw_cpu_seed>(), METH_FASTCALL,
     "draw_cpu_seed(generator=None) -> int: a Philox seed drawn from a CPU torch.Generator"},
    {"latent_terms_cpu_seed", fastcall<latent_terms_cpu_seed>(), METH_FASTCALL,
     "latent_terms_cpu_seed(mu, logvar, num_samples, generator, row_offset, stl) -> (z, kl, log_q, log_p)"},
    {"cpu_level", cpu_level, METH_NOARGS,
     "cpu_level() -> str: the level the float32 CPU loops run at: avx512, avx2 or baseline (FASTVAE_CPU_LEVEL)"},
    {"fused_likelihoods", fused_likelihoods, METH_NOARGS,
     "fused_likelihoods() -> tuple[str, ...]: the name of every fused likelihood (csrc/fastvae.h, kName)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastvae fused ops (see torch.ops.fastvae)", -1, methods};
  return PyModule_Create(&module);
}
