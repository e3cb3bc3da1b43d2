// CUDA implementation of sparse_input_linear (same contract as
// csrc/cpu/sparse_linear.cpp): the dense product. At the sizes of an encoder's
// first layer (a minibatch of images by a few hundred units) cuBLAS finishes
// in a few microseconds; a walk over the nonzeros would need the indices
// gathered first and could not beat it, so the GPU keeps the dense math and
// the op stays one name for every device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../host.h"

namespace fastvae {
namespace gpu {
namespace {

// The forward and the weight gradient of SparseInputLinearOps (host.h) on the GPU.
struct CudaSparseLinearBackend {
  using Guard = c10::cuda::CUDAGuard;

  static at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
    return at::linear(x, weight, bias);
  }

  static at::Tensor weight_grad(const at::Tensor& grad2d, const at::Tensor& x2d) { return at::mm(grad2d.t(), x2d); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { SparseInputLinearOps<CudaSparseLinearBackend>::register_kernels(m); }

}  // namespace gpu
}  // namespace fastvae
