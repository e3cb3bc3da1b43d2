// mlp.h: a stack of Linear layers, each followed by an elementwise activation,
// as one op forward and one op backward (fastvae.nn.FusedMLP).
//
// Every product runs through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA) into
// buffers allocated once per call; what a device contributes is the two
// elementwise passes around them (struct Elementwise): the bias and activation
// applied to a product's output in place, and in the backward the activation's
// derivative and the bias gradient taken in one pass over the incoming
// gradient. The derivative of every supported activation is a function of its
// output (tanh: 1 - y^2, sigmoid: y (1 - y), relu: y > 0), so the forward saves
// each layer's activated output and nothing else. The layer walks live in
// mlp.cpp, once for every device; cpu/mlp.cpp and cuda/mlp.cu register them
// with their passes.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fastvae {
namespace mlp {

// The codes of the schema's `int[] activations` (fastvae/ops/_mlp.py names them).
enum class Activation : int64_t { kIdentity = 0, kTanh = 1, kRelu = 2, kSigmoid = 3 };

struct Elementwise {
  // Whether the forward product adds the bias itself (addmm; cuBLAS does it in the
  // product's epilogue), leaving the pass only the activation.
  bool bias_in_gemm;
  // y = act(y + bias) in place, y (rows, cols) contiguous; bias (cols,) or undefined.
  void (*bias_activation)(const at::Tensor& y, const at::Tensor& bias, Activation act);
  // grad_pre = grad * act'(.) from the output y (grad_pre may be grad itself), and
  // grad_bias = the column sums of grad_pre when grad_bias is defined. For the identity
  // grad_pre is grad and only the sums are taken.
  void (*activation_grad)(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& grad_pre,
                          const at::Tensor& grad_bias, Activation act);
};

// The passes as ATen ops, for any device and dtype (CUDA; half types on CPU).
const Elementwise& aten_elementwise_cpu();
const Elementwise& aten_elementwise_cuda();

using Biases = c10::List<c10::optional<at::Tensor>>;
using GradsAll = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// fastvae::mlp: the last layer's output, (..., out_features); hidden outputs are not kept.
at::Tensor forward(const Elementwise& e, const at::Tensor& x, at::TensorList weights, const Biases& biases,
                   at::IntArrayRef activations);
// fastvae::mlp_forward: every layer's output, each (..., out_features_i).
std::vector<at::Tensor> forward_saving(const Elementwise& e, const at::Tensor& x, at::TensorList weights,
                                       const Biases& biases, at::IntArrayRef activations);
// fastvae::mlp_backward: (grad_x, grad_weights, grad_biases); gradients not asked for in
// needs_grad (x, then weight and bias of each layer) are empty (0,) tensors.
GradsAll backward(const Elementwise& e, const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
                  at::TensorList outputs, at::IntArrayRef activations, at::IntArrayRef needs_grad);

// The kernels of one device, for TORCH_LIBRARY_IMPL. The ATen calls inside a kernel run
// below autograd: a direct call of mlp_forward or mlp_backward (which have no autograd
// formula) with inputs that require grad must not reach the autograd of mm's out= form.
template <const Elementwise& (*kPasses)()>
struct Kernels {
  static at::Tensor mlp(const at::Tensor& x, at::TensorList weights, const Biases& biases,
                        at::IntArrayRef activations) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward(kPasses(), x, weights, biases, activations);
  }
  static std::vector<at::Tensor> mlp_forward(const at::Tensor& x, at::TensorList weights, const Biases& biases,
                                             at::IntArrayRef activations) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return forward_saving(kPasses(), x, weights, biases, activations);
  }
  static GradsAll mlp_backward(const at::Tensor& grad, const at::Tensor& x, at::TensorList weights,
                               at::TensorList outputs, at::IntArrayRef activations, at::IntArrayRef needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return backward(kPasses(), grad, x, weights, outputs, activations, needs_grad);
  }
  static void register_kernels(torch::Library& m) {
    m.impl("mlp", &mlp);
    m.impl("mlp_forward", &mlp_forward);
    m.impl("mlp_backward", &mlp_backward);
  }
};

}  // namespace mlp
}  // namespace fastvae
