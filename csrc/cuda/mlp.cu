// CUDA kernels of the fused Linear/activation stack (csrc/mlp.h): the layer walks
// of mlp.cpp with ATen's elementwise passes. The bias goes into each product
// (cuBLAS adds it in the GEMM's epilogue), leaving one in-place activation pass
// per layer forward and one derivative pass per layer backward.
#include <torch/library.h>

#include "../mlp.h"

namespace fastvae {
namespace gpu {

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { mlp::Kernels<&mlp::aten_elementwise_cuda>::register_kernels(m); }

}  // namespace gpu
}  // namespace fastvae
