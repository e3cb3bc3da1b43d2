// CUDA implementation of the fused reconstruction log-likelihood ops.
//
// Same contract as csrc/cpu/likelihood.cpp, with the per-element math taken
// from csrc/fastvae.h. The decoder output has one row per (sample l, example
// b): (L, B, P) or (B, P); x is (B, P) and is broadcast over l. Half and
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

enum class Likelihood { kBernoulli, kGaussian };

template <Likelihood kKind, typename T>
__device__ __forceinline__ T element_log_prob(const LikelihoodArgs<T>& a, int64_t i, T param, T x) {
  if constexpr (kKind == Likelihood::kBernoulli) {
    return bernoulli_log_prob(param, x);
  } else {
    if (a.logvar != nullptr) {
      const T lv = a.logvar[i];
      return gaussian_log_prob(param, x, lv, exp_of(-lv));
    }
    return gaussian_log_prob(param, x, a.logvar_value, a.fixed_inv_var);
  }
}

template <Likelihood kKind, typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) likelihood_forward_kernel(const LikelihoodArgs<T> a) {
  using BlockReduce = cub::BlockReduce<T, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const int64_t P = a.pixels;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {  // row is uniform over the block
    const T* params = a.params + row * P;
    const T* x = a.x + (row % a.batch) * P;
    T acc = T(0);
    for (int64_t p = threadIdx.x; p < P; p += kThreads) {
      acc += element_log_prob<kKind>(a, row * P + p, params[p], x[p]);
    }
    const T total = BlockReduce(temp).Sum(acc);
    if (threadIdx.x == 0) {
      if constexpr (kKind == Likelihood::kGaussian) {
        a.out[row] = total + T(-0.5 * kLog2Pi) * static_cast<T>(P);
      } else {
        a.out[row] = total;
      }
    }
    __syncthreads();  // temp is reused by the next row
  }
}

template <Likelihood kKind, typename T>
__global__ void __launch_bounds__(kFlatThreads) likelihood_backward_kernel(const LikelihoodArgs<T> a) {
  const int64_t P = a.pixels, n = a.batch * P, samples = a.rows / a.batch;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / P, p = idx % P;
    const T xv = a.x[idx];
    T gx = T(0);
    for (int64_t l = 0; l < samples; ++l) {
      const int64_t row = l * a.batch + b;
      const int64_t i = row * P + p;
      const T g = a.grad[row];
      const T param = a.params[i];
      if constexpr (kKind == Likelihood::kBernoulli) {
        a.out[i] = g * bernoulli_grad_logit(param, xv);
        gx += g * param;  // d/dx (x*a) = a
      } else {
        const T inv_var = a.logvar != nullptr ? exp_of(-a.logvar[i]) : a.fixed_inv_var;
        T dm, ds;
        gaussian_grads(param, xv, inv_var, &dm, &ds);
        a.out[i] = g * dm;
        if (a.grad_logvar != nullptr) a.grad_logvar[i] = g * ds;
        gx -= g * dm;  // d/dx = -d/dm
      }
    }
    if (a.grad_x != nullptr) a.grad_x[idx] = gx;
  }
}

// Grid size for a grid-stride loop over `units` (rows, or elements / threads).
unsigned int grid_for(int64_t units) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return static_cast<unsigned int>(std::min(std::max<int64_t>(units, 1), kMaxBlocks));
}

template <Likelihood kKind, typename T>
void launch_forward(const LikelihoodArgs<T>& a) {
  if (a.rows == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Smallest power of two in [32, 256] threads that covers a row.
  if (a.pixels <= 32) {
    likelihood_forward_kernel<kKind, T, 32><<<grid_for(a.rows), 32, 0, stream>>>(a);
  } else if (a.pixels <= 64) {
    likelihood_forward_kernel<kKind, T, 64><<<grid_for(a.rows), 64, 0, stream>>>(a);
  } else if (a.pixels <= 128) {
    likelihood_forward_kernel<kKind, T, 128><<<grid_for(a.rows), 128, 0, stream>>>(a);
  } else {
    likelihood_forward_kernel<kKind, T, 256><<<grid_for(a.rows), 256, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Likelihood kKind, typename T>
void launch_backward(const LikelihoodArgs<T>& a) {
  const int64_t n = a.batch * a.pixels;
  if (n == 0 || a.rows == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  likelihood_backward_kernel<kKind, T>
      <<<grid_for((n + kFlatThreads - 1) / kFlatThreads), kFlatThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bernoulli_log_prob(const at::Tensor& logits, const at::Tensor& x) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const LikelihoodIO io = prepare_likelihood(logits, x, c10::nullopt, 0.0, "logits");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::bernoulli_log_prob (CUDA)",
                             [&] { launch_forward<Likelihood::kBernoulli>(io.args<scalar_t>()); });
  return io.out;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad, const at::Tensor& logits,
                                                               const at::Tensor& x, bool needs_grad_x) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const LikelihoodIO io = prepare_likelihood_backward(grad, logits, x, c10::nullopt, 0.0, needs_grad_x, "logits");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::bernoulli_log_prob_backward (CUDA)",
                             [&] { launch_backward<Likelihood::kBernoulli>(io.args<scalar_t>()); });
  auto [grad_logits, unused, grad_x] = io.grads();
  return {grad_logits, grad_x};
}

at::Tensor gaussian_log_prob(const at::Tensor& mean, const at::Tensor& x, const c10::optional<at::Tensor>& logvar,
                             double logvar_value) {
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const LikelihoodIO io = prepare_likelihood(mean, x, logvar, logvar_value, "mean");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::gaussian_log_prob (CUDA)",
                             [&] { launch_forward<Likelihood::kGaussian>(io.args<scalar_t>()); });
  return io.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(const at::Tensor& grad,
                                                                          const at::Tensor& mean, const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& logvar,
                                                                          double logvar_value, bool needs_grad_x) {
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const LikelihoodIO io = prepare_likelihood_backward(grad, mean, x, logvar, logvar_value, needs_grad_x, "mean");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::gaussian_log_prob_backward (CUDA)",
                             [&] { launch_backward<Likelihood::kGaussian>(io.args<scalar_t>()); });
  return io.grads();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) {
  m.impl("bernoulli_log_prob", &bernoulli_log_prob);
  m.impl("bernoulli_log_prob_backward", &bernoulli_log_prob_backward);
  m.impl("gaussian_log_prob", &gaussian_log_prob);
  m.impl("gaussian_log_prob_backward", &gaussian_log_prob_backward);
}

}  // namespace gpu
}  // namespace fastvae
