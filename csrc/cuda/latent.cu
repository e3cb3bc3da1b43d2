// CUDA implementation of the fused latent op and its backward.
//
// Same contract as csrc/cpu/latent.cpp, with the per-element math taken from
// csrc/fastvae.h (nothing is re-derived here). Half and bfloat16 inputs are
// upcast to float32 first and z is cast back, exactly like the CPU path, so
// the dtypes of the outputs (and the float32 sums) are the same on both.
//
// Forward: one block per row (l, b) of z. The noise of element (l, b, d) is
// normal i%4 of Philox block noise_block(l, i/4), with i = (b + row_offset)*D + d
// its within-sample index (csrc/fastvae.h): the same stream as the CPU loops.
// The kernel reads the Philox (seed, offset) from an at::PhiloxCudaState, as
// torch's own random kernels do: plain values for latent_terms (an explicit
// seed) and for an eager call of latent_terms_from_generator; device pointers
// plus a per-capture increment when latent_terms_from_generator is recorded into
// a CUDA graph, so that every replay reads the generator's offset of that moment
// and draws fresh noise.
// Thread k of a block owns the Philox blocks k, k + kThreads, ... of its row's
// index range, so each Philox call feeds four elements. The row sums (kl,
// log_q, log_p) are one block reduction in the accumulation type (float32, or
// float64 for double).
//
// Backward: one thread per (b, d), looping over the L samples, so the sums
// over l need no atomics and the result does not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>
#include <limits>
#include <mutex>
#include <type_traits>

#include "../fastvae.h"
#include "../host.h"

namespace fastvae {
namespace gpu {  // (not "cuda": that would shadow ::cuda inside CCCL macros)
namespace {

constexpr int kFlatThreads = 256;  // threads per block of the element-wise kernels

// How far one call moves the CUDA generator's Philox offset: what fastvae's host-side draw
// always moved it (fastvae.ops.draw_seed), so eager noise is unchanged. The offset is the high
// half of each element's counter (fastvae.h, normal4), so any step keeps calls apart, and torch
// keeps offsets in multiples of 4.
constexpr uint64_t kOffsetIncrement = 4;

// The three per-row sums of the forward (fastvae.h, latent_element), reduced together in one pass.
template <typename T>
struct LatentSums {
  T kl2, eps_sq_logvar, z_sq;
};

struct AddLatentSums {
  template <typename T>
  __device__ __forceinline__ LatentSums<T> operator()(const LatentSums<T>& a, const LatentSums<T>& b) const {
    return LatentSums<T>{a.kl2 + b.kl2, a.eps_sq_logvar + b.eps_sq_logvar, a.z_sq + b.z_sq};
  }
};

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads)
    latent_forward_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, const T* __restrict__ eps,
                          T* __restrict__ z, T* __restrict__ kl, T* __restrict__ log_q, T* __restrict__ log_p,
                          int64_t rows, int64_t batch, int64_t dim, at::PhiloxCudaState philox,
                          int64_t row_offset) {
  // The seed is kept in [0, 2**63) as on the host (fastvae.ops checks explicit seeds so; the
  // generator's seed is masked to that range, as fastvae's host-side draw always did).
  const auto seed_and_offset = at::cuda::philox::unpack(philox);
  const uint64_t seed = std::get<0>(seed_and_offset) & static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  const uint64_t offset = std::get<1>(seed_and_offset);
  using BlockReduce = cub::BlockReduce<LatentSums<T>, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // row is uniform over the block
    const int64_t sample = row / batch, b = row % batch;
    const T* mu_row = mu + b * dim;
    const T* logvar_row = logvar + b * dim;
    const T* eps_row = eps != nullptr ? eps + row * dim : nullptr;
    T* z_row = z + row * dim;
    // Within-sample noise indices of this row: [first, last).
    const int64_t first = (b + row_offset) * dim, last = first + dim;
    LatentSums<T> acc{T(0), T(0), T(0)};
    for (int64_t block = first / 4 + threadIdx.x; 4 * block < last; block += kThreads) {
      float normals[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (eps_row == nullptr) {
        normal4(seed, offset, noise_block(static_cast<uint64_t>(sample), static_cast<uint64_t>(block)), normals);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = 4 * block + j;
        if (i < first || i >= last) continue;  // the Philox block straddles a row boundary
        const int64_t d = i - first;
        const T m = mu_row[d];
        const T lv = logvar_row[d];
        const T e = eps_row != nullptr ? eps_row[d] : static_cast<T>(normals[j]);
        z_row[d] = latent_element(m, lv, e, acc.kl2, acc.eps_sq_logvar, acc.z_sq);
      }
    }
    const LatentSums<T> total = BlockReduce(temp).Reduce(acc, AddLatentSums());
    if (threadIdx.x == 0) {
      const LatentRowResults<T> r = latent_row_results(total.kl2, total.eps_sq_logvar, total.z_sq, dim);
      log_q[row] = r.log_q;
      log_p[row] = r.log_p;
      if (row < batch) kl[b] = r.kl;  // KL does not depend on the sample: written once
    }
    __syncthreads();  // temp is reused by the next row
  }
}

template <typename T>
__global__ void __launch_bounds__(kFlatThreads)
    latent_backward_kernel(const T* __restrict__ grad_z, const T* __restrict__ grad_kl,
                           const T* __restrict__ grad_log_q, const T* __restrict__ grad_log_p,
                           const T* __restrict__ z, const T* __restrict__ mu, const T* __restrict__ logvar,
                           T* __restrict__ grad_mu, T* __restrict__ grad_logvar, int64_t samples, int64_t batch,
                           int64_t dim, bool stl) {
  const int64_t n = batch * dim;
  const bool path_log_q = stl && grad_log_q != nullptr;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / dim, d = idx % dim;
    const T m = mu[idx];
    const T lv = logvar[idx];
    const T gkl = grad_kl != nullptr ? grad_kl[b] : T(0);
    // log_q = sum(-0.5*eps^2 - 0.5*logvar) with eps fixed: -0.5 per dimension for logvar.
    T glq_sum = T(0);
    if (!stl && grad_log_q != nullptr) {
      for (int64_t l = 0; l < samples; ++l) glq_sum += grad_log_q[l * batch + b];
    }
    T gmu = gkl * m;
    T glv = gkl * T(0.5) * (exp_of(lv) - T(1)) - T(0.5) * glq_sum;
    const T inv_var = path_log_q ? exp_of(-lv) : T(0);
    for (int64_t l = 0; l < samples; ++l) {
      const int64_t row = l * batch + b;
      const int64_t i = row * dim + d;
      const T zi = z[i];
      const T glp = grad_log_p != nullptr ? grad_log_p[row] : T(0);
      const T glq_path = path_log_q ? grad_log_q[row] : T(0);
      const T gz = grad_z != nullptr ? grad_z[i] : T(0);
      const T g = latent_grad_through_z(gz, glp, glq_path, zi, m, inv_var);
      gmu += g;
      glv += g * T(0.5) * (zi - m);
    }
    grad_mu[idx] = gmu;
    grad_logvar[idx] = glv;
  }
}

// Smallest power of two in [32, 256] threads that covers `work` units of a row.
template <typename F>
void with_block_threads(int64_t work, const F& f) {
  if (work <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (work <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (work <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

// Grid size for a grid-stride loop over `units` (rows or elements / threads).
unsigned int grid_for(int64_t units) {
  constexpr int64_t kMaxBlocks = int64_t(1) << 30;
  return static_cast<unsigned int>(std::min(std::max<int64_t>(units, 1), kMaxBlocks));
}

// Half and bfloat16 are computed in float32 (inputs upcast once, z cast back).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_latent_forward(const LatentForwardIO& io,
                                                                            const at::PhiloxCudaState& philox) {
  const int64_t rows = io.samples * io.batch;
  if (rows > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::latent_terms (CUDA)", [&] {
      const auto a = io.args<scalar_t>();
      // A row touches about D/4 Philox blocks (at most two more where it straddles them):
      // one per thread, the odd extra one taking a second turn of the loop.
      with_block_threads((a.dim + 3) / 4, [&](auto threads) {
        constexpr int kThreads = decltype(threads)::value;
        latent_forward_kernel<scalar_t, kThreads><<<grid_for(rows), kThreads, 0, stream>>>(
            a.mu, a.logvar, a.eps, a.z, a.kl, a.log_q, a.log_p, rows, a.batch, a.dim, philox, a.row_offset);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return io.result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_terms(const at::Tensor& mu,
                                                                      const at::Tensor& logvar,
                                                                      const c10::optional<at::Tensor>& eps,
                                                                      c10::optional<int64_t> num_samples, int64_t seed,
                                                                      int64_t offset, int64_t row_offset,
                                                                      bool /*stl*/) {
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const LatentForwardIO io = prepare_latent_forward(mu, logvar, eps, num_samples, seed, offset, row_offset);
  return run_latent_forward(io, at::PhiloxCudaState(io.seed, io.offset));
}

// The generator's (seed, offset), moved on by kOffsetIncrement per call: eagerly the values
// fastvae.ops.draw_seed reads from Python, so a seed gives the noise it always gave.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> latent_terms_from_generator(
    const at::Tensor& mu, const at::Tensor& logvar, c10::optional<int64_t> num_samples,
    const c10::optional<at::Generator>& generator, int64_t row_offset, bool /*stl*/) {
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const LatentForwardIO io = prepare_latent_forward(mu, logvar, c10::nullopt, num_samples, 0, 0, row_offset);
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(mu.device().index()));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kOffsetIncrement);
  }
  return run_latent_forward(io, philox);
}

std::tuple<at::Tensor, at::Tensor> latent_terms_backward(
    const c10::optional<at::Tensor>& grad_z, const c10::optional<at::Tensor>& grad_kl,
    const c10::optional<at::Tensor>& grad_log_q, const c10::optional<at::Tensor>& grad_log_p, const at::Tensor& z,
    const at::Tensor& mu, const at::Tensor& logvar, bool stl) {
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const LatentBackwardIO io = prepare_latent_backward(grad_z, grad_kl, grad_log_q, grad_log_p, z, mu, logvar, stl);
  const int64_t n = io.batch * io.dim;
  if (n > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::latent_terms_backward (CUDA)", [&] {
      const auto a = io.args<scalar_t>();
      latent_backward_kernel<scalar_t><<<grid_for((n + kFlatThreads - 1) / kFlatThreads), kFlatThreads, 0, stream>>>(
          a.grad_z, a.grad_kl, a.grad_log_q, a.grad_log_p, a.z, a.mu, a.logvar, a.grad_mu, a.grad_logvar,
          a.samples, a.batch, a.dim, a.stl);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return io.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CUDA, m) {
  m.impl("latent_terms", &latent_terms);
  m.impl("latent_terms_from_generator", &latent_terms_from_generator);
  m.impl("latent_terms_backward", &latent_terms_backward);
}

}  // namespace gpu
}  // namespace fastvae
