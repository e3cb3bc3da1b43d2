// CUDA kernels of the prior ops: the same contract as csrc/cpu/priors.cpp, the host
// side (layouts, checks, the mixture's matmuls) shared in csrc/priors_host.h and the
// per-element math in csrc/priors.h.
//
// Row-broadcast forward: one warp per result row, a shuffle reduction of its sum.
// Backward pass: one thread per element of the operands it computes, looping over the
// result rows that read the element (one writer: no atomics, the same result every run).
// Mixture: one thread per (z row, component) pair, which returns at once unless the
// pair is flagged; a flagged pair's gradients go out with atomicAdd (the flagged pairs
// are few, and several of them share a row of z or a component).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../priors_host.h"

namespace fastvae {
namespace gpu {  // (not "cuda": that would shadow ::cuda inside CCCL macros)
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

unsigned int blocks_for(int64_t units, int64_t per_block) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return static_cast<unsigned int>(std::min(std::max<int64_t>((units + per_block - 1) / per_block, 1), kMaxBlocks));
}

template <class E, typename T>
__global__ void __launch_bounds__(kThreads) row_broadcast_forward_kernel(const RowBroadcastArgs<T, E::kOperands> a) {
  constexpr int N = E::kOperands;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = kThreads / kWarp, D = a.dim;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / kWarp; r < a.rows; r += int64_t(gridDim.x) * warps) {
    T sum = T(0);
    const T* row[N];
    for (int i = 0; i < N; ++i) row[i] = a.in[i] + (r % a.in_rows[i]) * D;
    for (int64_t d = lane; d < D; d += kWarp) sum += element_value<E>(row, d);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) a.out[r] = sum + E::template row_constant<T>(D);
  }
}

template <class E, typename T>
__global__ void __launch_bounds__(kThreads) row_broadcast_backward_kernel(const RowBroadcastArgs<T, E::kOperands> a) {
  constexpr int N = E::kOperands;
  const int64_t D = a.dim, elements = a.pass_rows * D, repeats = a.rows / a.pass_rows;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < elements;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t j = idx / D, d = idx % D;
    T acc[N];
    for (int i = 0; i < N; ++i) acc[i] = T(0);
    for (int64_t t = 0; t < repeats; ++t) {
      const int64_t r = t * a.pass_rows + j;
      const T* row[N];
      T g[N];
      T* g_out[N];
      for (int i = 0; i < N; ++i) {
        row[i] = a.in[i] + (r % a.in_rows[i]) * D;
        g_out[i] = g + i;
      }
      element_grads<E>(row, d, g_out, 0);
      const T incoming = a.grad[r];
      for (int i = 0; i < N; ++i) acc[i] += incoming * g[i];
    }
    for (int i = 0; i < N; ++i) {
      if (a.grad_in[i] != nullptr) a.grad_in[i][idx] = acc[i];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) recompute_flagged_kernel(T* q, const bool* flagged, const T* z,
                                                                     const T* m, const T* inv, int64_t rows,
                                                                     int64_t components, int64_t D) {
  for (int64_t pair = int64_t(blockIdx.x) * kThreads + threadIdx.x; pair < rows * components;
       pair += int64_t(gridDim.x) * kThreads) {
    if (!flagged[pair]) continue;
    const int64_t n = pair / components, k = pair % components;
    T sum = T(0);
    for (int64_t d = 0; d < D; ++d) sum += scaled_square(z[n * D + d], m[k * D + d], inv[k * D + d]);
    q[pair] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) add_flagged_grads_kernel(const T* resp, const T* grad, const T* z,
                                                                     const T* m, const T* inv, T* gz, T* gm, T* glv,
                                                                     int64_t rows, int64_t components, int64_t D) {
  for (int64_t pair = int64_t(blockIdx.x) * kThreads + threadIdx.x; pair < rows * components;
       pair += int64_t(gridDim.x) * kThreads) {
    if (!(resp[pair] < T(0))) continue;
    const int64_t n = pair / components, k = pair % components;
    const T w = -resp[pair] * grad[n];
    for (int64_t d = 0; d < D; ++d) {
      const PairGrads<T> p = flagged_pair_grads(w, z[n * D + d], m[k * D + d], inv[k * D + d]);
      atomicAdd(gz + n * D + d, p.z);
      atomicAdd(gm + k * D + d, p.mean);
      atomicAdd(glv + k * D + d, p.logvar);
    }
  }
}

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  template <class E, typename T>
  static void forward(const RowBroadcastArgs<T, E::kOperands>& a) {
    row_broadcast_forward_kernel<E, T>
        <<<blocks_for(a.rows, kThreads / kWarp), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <class E, typename T>
  static void backward_pass(const RowBroadcastArgs<T, E::kOperands>& a) {
    row_broadcast_backward_kernel<E, T>
        <<<blocks_for(a.pass_rows * a.dim, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void recompute_flagged(at::Tensor& Q, const at::Tensor& flagged, const at::Tensor& Z,
                                const at::Tensor& means, const at::Tensor& inv_var) {
    const int64_t rows = Q.size(0), components = Q.size(1);
    if (rows * components == 0) return;
    const at::Tensor flags = flagged.contiguous();
    AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "fastvae::mixture_recompute_flagged", [&] {
      recompute_flagged_kernel<scalar_t><<<blocks_for(rows * components, kThreads), kThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(
          Q.data_ptr<scalar_t>(), flags.data_ptr<bool>(), Z.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
          inv_var.data_ptr<scalar_t>(), rows, components, Z.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void add_flagged_grads(const at::Tensor& resp, const at::Tensor& grad, const at::Tensor& Z,
                                const at::Tensor& means, const at::Tensor& inv_var, at::Tensor& grad_z,
                                at::Tensor& grad_means, at::Tensor& grad_logvars) {
    const int64_t rows = resp.size(0), components = resp.size(1);
    if (rows * components == 0 || Z.size(1) == 0) return;
    AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "fastvae::mixture_add_flagged_grads", [&] {
      add_flagged_grads_kernel<scalar_t><<<blocks_for(rows * components, kThreads), kThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(
          resp.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), Z.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
          inv_var.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(), grad_means.data_ptr<scalar_t>(),
          grad_logvars.data_ptr<scalar_t>(), rows, components, Z.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) { register_prior_kernels<CudaKernels>(m); }

}  // namespace gpu
}  // namespace fastvae
