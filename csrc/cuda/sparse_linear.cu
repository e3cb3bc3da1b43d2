// CUDA implementation of sparse_input_linear (same contract as
// csrc/cpu/sparse_linear.cpp): the dense product. At the sizes of an encoder's
// first layer (a minibatch of images by a few hundred units) cuBLAS finishes
// in a few microseconds; a walk over the nonzeros would need the indices
// gathered first and could not beat it, so the GPU keeps the dense math and
// the op stays one name for every device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../host.h"

namespace fastvae {
namespace gpu {
namespace {

at::Tensor sparse_input_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_sparse_input_linear_inputs(x, weight, bias);
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_input_linear_backward(const at::Tensor& grad,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& weight,
                                                                          bool needs_grad_x, bool needs_grad_weight,
                                                                          bool needs_grad_bias) {
  return sparse_input_linear_grads<c10::cuda::CUDAGuard>(
      grad, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias,
      [](const at::Tensor& grad2d, const at::Tensor& x2d) { return at::mm(grad2d.t(), x2d); });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) {
  m.impl("sparse_input_linear", &sparse_input_linear);
  m.impl("sparse_input_linear_backward", &sparse_input_linear_backward);
}

}  // namespace gpu
}  // namespace fastvae
