// CUDA implementation of the fused reconstruction log-likelihood ops.
//
// Same contract as csrc/cpu/likelihood.cpp: one forward and one backward kernel
// template for every likelihood of csrc/fastvae.h (FusedLikelihoods), with the
// per-element math taken from its traits struct. The decoder output has one
// row per (sample l, example b): (L, B, P) or (B, P); x is (B, P) and is broadcast over l. Half and
// bfloat16 are upcast to float32 first, like the CPU path, so the row sums
// are float32 for them and the gradients are cast back to the input dtype.
//
// Forward: one block per row, a block reduction of the row's sum in the
// accumulation type. Backward: one thread per (b, p) that loops over the L
// samples, writing grad_params for each and summing grad_x over l itself (one
// writer per element: no atomics, the same result on every run).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <type_traits>

#include "../fastvae.h"
#include "../host.h"

namespace fastvae {
namespace gpu {  // (not "cuda": that would shadow ::cuda inside CCCL macros)
namespace {

constexpr int kFlatThreads = 256;  // threads per block of the element-wise kernels

// The second parameter of element i: from the tensor when there is one, else
// the value made once per thread.
template <class D, typename T>
__device__ __forceinline__ typename D::template Second<T> second_at(const LikelihoodArgs<T>& a, int64_t i,
                                                                     typename D::template Second<T> fixed) {
  if constexpr (has_second<D>()) {
    if (a.second != nullptr) return D::second(a.second[i]);
  }
  return fixed;
}

template <class D, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) likelihood_forward_kernel(const LikelihoodArgs<T> a) {
  using BlockReduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const int64_t P = a.pixels;
  const auto fixed = D::second(a.second_value);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {  // row is uniform over the block
    const T* params = a.params + row * P;
    const T* x = a.x + (row % a.batch) * P;
    T acc = T(0);
    for (int64_t p = threadIdx.x; p < P; p += kThreads) {
      acc += D::log_prob(params[p], second_at<D>(a, row * P + p, fixed), x[p]);
    }
    const T total = BlockReduce(temp).Sum(acc);
    if (threadIdx.x == 0) a.out[row] = total + D::template row_constant<T>(P);
    __syncthreads();  // temp is reused by the next row
  }
}

template <class D, typename T>
__global__ void __launch_bounds__(kFlatThreads) likelihood_backward_kernel(const LikelihoodArgs<T> a) {
  const int64_t P = a.pixels, n = a.batch * P, samples = a.rows / a.batch;
  const auto fixed = D::second(a.second_value);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / P, p = idx % P;
    const T xv = a.x[idx];
    T gx = T(0);
    for (int64_t l = 0; l < samples; ++l) {
      const int64_t row = l * a.batch + b;
      const int64_t i = row * P + p;
      const T g = a.grad[row];
      const LikelihoodGrads<T> d = D::grads(a.params[i], second_at<D>(a, i, fixed), xv);
      a.out[i] = g * d.param;
      if (a.grad_second != nullptr) a.grad_second[i] = g * d.second;
      gx += g * d.x;
    }
    if (a.grad_x != nullptr) a.grad_x[idx] = gx;
  }
}

// Grid size for a grid-stride loop over `units` (rows, or elements / threads).
unsigned int grid_for(int64_t units) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return static_cast<unsigned int>(std::min(std::max<int64_t>(units, 1), kMaxBlocks));
}

template <class D, typename T>
void launch_forward(const LikelihoodArgs<T>& a) {
  if (a.rows == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Smallest power of two in [32, 256] threads that covers a row.
  if (a.pixels <= 32) {
    likelihood_forward_kernel<D, T, 32><<<grid_for(a.rows), 32, 0, stream>>>(a);
  } else if (a.pixels <= 64) {
    likelihood_forward_kernel<D, T, 64><<<grid_for(a.rows), 64, 0, stream>>>(a);
  } else if (a.pixels <= 128) {
    likelihood_forward_kernel<D, T, 128><<<grid_for(a.rows), 128, 0, stream>>>(a);
  } else {
    likelihood_forward_kernel<D, T, 256><<<grid_for(a.rows), 256, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class D, typename T>
void launch_backward(const LikelihoodArgs<T>& a) {
  const int64_t n = a.batch * a.pixels;
  if (n == 0) return;
  if (a.rows == 0) {  // no samples: grad_x is a sum of nothing
    if (a.grad_x != nullptr) {
      C10_CUDA_CHECK(cudaMemsetAsync(a.grad_x, 0, n * sizeof(T), at::cuda::getCurrentCUDAStream()));
    }
    return;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  likelihood_backward_kernel<D, T><<<grid_for((n + kFlatThreads - 1) / kFlatThreads), kFlatThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  template <class D, typename T>
  static void run(const LikelihoodArgs<T>& a, bool backward) {
    backward ? launch_backward<D>(a) : launch_forward<D>(a);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { register_likelihood_kernels<CudaBackend>(m); }

}  // namespace gpu
}  // namespace fastvae
