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

#include "../checks.h"
#include "../fastvae.h"

namespace fastvae {
namespace gpu {  // (not "cuda": that would shadow ::cuda inside CCCL macros)
namespace {

constexpr int kFlatThreads = 256;  // threads per block of the element-wise kernels

enum class Likelihood { kBernoulli, kGaussian };

// Everything a likelihood kernel needs. `logvar` is the Gaussian's per-element
// log-variance (nullptr: the single value `logvar_value`, whose exp(-s) the
// host computes once as `fixed_inv_var`, for every element).
template <typename T>
struct LikelihoodArgs {
  const T* params;  // logits or means, (rows, P)
  const T* x;       // (B, P)
  const T* logvar;  // (rows, P) or nullptr
  T logvar_value;
  T fixed_inv_var;
  const T* grad;   // (rows) incoming gradient, backward only
  T* out;          // forward: (rows); backward: grad_params (rows, P)
  T* grad_logvar;  // backward, Gaussian with a logvar tensor: (rows, P)
  T* grad_x;       // backward, when x requires grad: (B, P), else nullptr
  int64_t rows, batch, pixels;
};

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

at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// (L, B, P) or (B, P) params -> number of rows L*B; the output keeps params' leading shape.
at::Tensor row_output(const at::Tensor& params, at::ScalarType dtype) {
  return at::empty(params.sizes().slice(0, params.dim() - 1), params.options().dtype(dtype));
}

// The incoming gradient is not covered by checks.h; host memory must never reach a kernel.
void check_grad(const at::Tensor& grad, const at::Tensor& params, const at::Tensor& x) {
  TORCH_CHECK(grad.device() == params.device(), "fastvae: grad is on ", grad.device(), " but the decoder output is on ",
              params.device(), "; they must be on the same device");
  TORCH_CHECK(grad.numel() * x.size(1) == params.numel(), "fastvae: grad must have shape ",
              params.sizes().slice(0, params.dim() - 1), ", got ", grad.sizes());
}

c10::optional<at::Tensor> checked_logvar(const c10::optional<at::Tensor>& logvar, const at::Tensor& mean) {
  if (!logvar.has_value()) return c10::nullopt;
  check_same(*logvar, mean, "logvar", "mean");
  TORCH_CHECK(logvar->sizes() == mean.sizes(), "fastvae: logvar must have the shape of mean ", mean.sizes(),
              " (broadcast it first), got ", logvar->sizes());
  return logvar;
}

at::Tensor bernoulli_log_prob(const at::Tensor& logits_in, const at::Tensor& x_in) {
  check_likelihood_inputs(logits_in, x_in, "logits");
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::ScalarType dtype = sum_dtype(logits_in.scalar_type());
  const at::Tensor logits = contiguous_as(logits_in, dtype), x = contiguous_as(x_in, dtype);
  at::Tensor out = row_output(logits, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::bernoulli_log_prob (CUDA)", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = logits.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.rows = out.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    launch_forward<Likelihood::kBernoulli>(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad_in,
                                                               const at::Tensor& logits_in, const at::Tensor& x_in,
                                                               bool needs_grad_x) {
  check_likelihood_inputs(logits_in, x_in, "logits");
  check_grad(grad_in, logits_in, x_in);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::ScalarType dtype = sum_dtype(logits_in.scalar_type());
  const at::Tensor logits = contiguous_as(logits_in, dtype), x = contiguous_as(x_in, dtype);
  const at::Tensor grad = contiguous_as(grad_in, dtype);
  at::Tensor grad_logits = at::empty_like(logits);
  at::Tensor grad_x = needs_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::bernoulli_log_prob_backward (CUDA)", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = logits.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.grad = grad.data_ptr<scalar_t>();
    a.out = grad_logits.data_ptr<scalar_t>();
    a.grad_x = needs_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    a.rows = grad.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    launch_backward<Likelihood::kBernoulli>(a);
  });
  if (needs_grad_x && grad.numel() == 0) grad_x.zero_();  // no samples: nothing flows to x
  return {grad_logits.to(logits_in.scalar_type()), grad_x.to(x_in.scalar_type())};
}

at::Tensor gaussian_log_prob(const at::Tensor& mean_in, const at::Tensor& x_in,
                             const c10::optional<at::Tensor>& logvar_in, double logvar_value) {
  check_likelihood_inputs(mean_in, x_in, "mean");
  const auto logvar_opt = checked_logvar(logvar_in, mean_in);
  const c10::cuda::CUDAGuard device_guard(mean_in.device());
  const at::ScalarType dtype = sum_dtype(mean_in.scalar_type());
  const at::Tensor mean = contiguous_as(mean_in, dtype), x = contiguous_as(x_in, dtype);
  const at::Tensor logvar = logvar_opt ? contiguous_as(*logvar_opt, dtype) : at::Tensor();
  at::Tensor out = row_output(mean, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::gaussian_log_prob (CUDA)", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = mean.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.logvar = logvar.defined() ? logvar.data_ptr<scalar_t>() : nullptr;
    a.logvar_value = static_cast<scalar_t>(logvar_value);
    a.fixed_inv_var = exp_of(-a.logvar_value);
    a.out = out.data_ptr<scalar_t>();
    a.rows = out.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    launch_forward<Likelihood::kGaussian>(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(
    const at::Tensor& grad_in, const at::Tensor& mean_in, const at::Tensor& x_in,
    const c10::optional<at::Tensor>& logvar_in, double logvar_value, bool needs_grad_x) {
  check_likelihood_inputs(mean_in, x_in, "mean");
  const auto logvar_opt = checked_logvar(logvar_in, mean_in);
  check_grad(grad_in, mean_in, x_in);
  const c10::cuda::CUDAGuard device_guard(mean_in.device());
  const at::ScalarType dtype = sum_dtype(mean_in.scalar_type());
  const at::Tensor mean = contiguous_as(mean_in, dtype), x = contiguous_as(x_in, dtype);
  const at::Tensor grad = contiguous_as(grad_in, dtype);
  const at::Tensor logvar = logvar_opt ? contiguous_as(*logvar_opt, dtype) : at::Tensor();
  at::Tensor grad_mean = at::empty_like(mean);
  at::Tensor grad_logvar = logvar.defined() ? at::empty_like(logvar) : at::empty({0}, mean.options());
  at::Tensor grad_x = needs_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::gaussian_log_prob_backward (CUDA)", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = mean.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.logvar = logvar.defined() ? logvar.data_ptr<scalar_t>() : nullptr;
    a.logvar_value = static_cast<scalar_t>(logvar_value);
    a.fixed_inv_var = exp_of(-a.logvar_value);
    a.grad = grad.data_ptr<scalar_t>();
    a.out = grad_mean.data_ptr<scalar_t>();
    a.grad_logvar = logvar.defined() ? grad_logvar.data_ptr<scalar_t>() : nullptr;
    a.grad_x = needs_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    a.rows = grad.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    launch_backward<Likelihood::kGaussian>(a);
  });
  if (needs_grad_x && grad.numel() == 0) grad_x.zero_();  // no samples: nothing flows to x
  const at::ScalarType out_dtype = mean_in.scalar_type();
  return {grad_mean.to(out_dtype), grad_logvar.to(out_dtype), grad_x.to(x_in.scalar_type())};
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
