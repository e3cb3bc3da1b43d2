// CPU implementation of the fused reconstruction log-likelihood ops.
//
// The decoder output has one row per (sample l, example b): (L, B, P) or
// (B, P); x is (B, P) and is broadcast over l. Each row is summed over P in
// one pass. Backward writes the per-element gradient scaled by the row's
// incoming gradient, and (only when x needs it) the gradient for x summed over l.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../host.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

template <typename T>
__attribute__((always_inline)) inline void bernoulli_forward_rows(const LikelihoodArgs<T>& a, int64_t begin,
                                                                  int64_t end) {
  const int64_t P = a.pixels;
  for (int64_t row = begin; row < end; ++row) {
    const T* logits = a.params + row * P;
    const T* x = a.x + (row % a.batch) * P;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < P; ++p) sum += bernoulli_log_prob(logits[p], x[p]);
    a.out[row] = sum;
  }
}

// Parallel over examples b, so that grad_x (a sum over samples) has one writer.
template <typename T>
__attribute__((always_inline)) inline void bernoulli_backward_examples(const LikelihoodArgs<T>& a, int64_t begin,
                                                                       int64_t end) {
  const int64_t P = a.pixels, samples = a.rows / a.batch;
  for (int64_t b = begin; b < end; ++b) {
    const T* x = a.x + b * P;
    T* gx = a.grad_x ? a.grad_x + b * P : nullptr;
    if (gx) std::fill(gx, gx + P, T(0));
    for (int64_t l = 0; l < samples; ++l) {
      const int64_t row = l * a.batch + b;
      const T g = a.grad[row];
      const T* logits = a.params + row * P;
      T* out = a.out + row * P;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) out[p] = g * bernoulli_grad_logit(logits[p], x[p]);
      if (gx) {
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) gx[p] += g * logits[p];  // d/dx (x*a) = a
      }
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void gaussian_forward_rows(const LikelihoodArgs<T>& a, int64_t begin,
                                                                 int64_t end) {
  const int64_t P = a.pixels;
  const T fixed_inv_var = a.fixed_inv_var;
  for (int64_t row = begin; row < end; ++row) {
    const T* mean = a.params + row * P;
    const T* x = a.x + (row % a.batch) * P;
    const T* logvar = a.logvar ? a.logvar + row * P : nullptr;
    T sum = 0;
    if (logvar) {
#pragma omp simd reduction(+ : sum)
      for (int64_t p = 0; p < P; ++p) sum += gaussian_log_prob(mean[p], x[p], logvar[p], exp_of(-logvar[p]));
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t p = 0; p < P; ++p) sum += gaussian_log_prob(mean[p], x[p], a.logvar_value, fixed_inv_var);
    }
    a.out[row] = sum + T(-0.5 * kLog2Pi) * static_cast<T>(P);
  }
}

template <typename T>
__attribute__((always_inline)) inline void gaussian_backward_examples(const LikelihoodArgs<T>& a, int64_t begin,
                                                                      int64_t end) {
  const int64_t P = a.pixels, samples = a.rows / a.batch;
  const T fixed_inv_var = a.fixed_inv_var;
  for (int64_t b = begin; b < end; ++b) {
    const T* x = a.x + b * P;
    T* gx = a.grad_x ? a.grad_x + b * P : nullptr;
    if (gx) std::fill(gx, gx + P, T(0));
    for (int64_t l = 0; l < samples; ++l) {
      const int64_t row = l * a.batch + b;
      const T g = a.grad[row];
      const T* mean = a.params + row * P;
      const T* logvar = a.logvar ? a.logvar + row * P : nullptr;
      T* gmean = a.out + row * P;
      T* glogvar = a.grad_logvar ? a.grad_logvar + row * P : nullptr;
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const T inv_var = logvar ? exp_of(-logvar[p]) : fixed_inv_var;
        T dm, ds;
        gaussian_grads(mean[p], x[p], inv_var, &dm, &ds);
        gmean[p] = g * dm;
        if (glogvar) glogvar[p] = g * ds;
        if (gx) gx[p] -= g * dm;  // d/dx = -d/dm
      }
    }
  }
}

enum class Kind { kBernoulliForward, kBernoulliBackward, kGaussianForward, kGaussianBackward };

template <Kind kKind, typename T>
__attribute__((always_inline)) inline void run_kind(const LikelihoodArgs<T>& a, int64_t begin, int64_t end) {
  if constexpr (kKind == Kind::kBernoulliForward) bernoulli_forward_rows(a, begin, end);
  if constexpr (kKind == Kind::kBernoulliBackward) bernoulli_backward_examples(a, begin, end);
  if constexpr (kKind == Kind::kGaussianForward) gaussian_forward_rows(a, begin, end);
  if constexpr (kKind == Kind::kGaussianBackward) gaussian_backward_examples(a, begin, end);
}

// float32 runs at the process's CPU level (cpu_level.h).
template <Kind kKind>
struct RunF32 {
  __attribute__((always_inline)) void operator()(const LikelihoodArgs<float>& a, int64_t begin, int64_t end) const {
    run_kind<kKind, float>(a, begin, end);
  }
};

template <Kind kKind, typename T>
void run(const LikelihoodArgs<T>& a) {
  const bool backward = kKind == Kind::kBernoulliBackward || kKind == Kind::kGaussianBackward;
  // Forward splits rows; backward splits examples (each owns its grad_x row).
  const int64_t units = backward ? a.batch : a.rows;
  if (units == 0) return;
  cpu_level();  // a bad FASTVAE_CPU_LEVEL is reported here, not from a worker thread
  const int64_t unit_len = backward ? (a.rows / std::max<int64_t>(a.batch, 1)) * a.pixels : a.pixels;
  parallel_rows(units, unit_len, kElementsPerTask, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      run_at_cpu_level<RunF32<kKind>>(a, begin, end);
    } else {
      run_kind<kKind, T>(a, begin, end);
    }
  });
}

at::Tensor bernoulli_log_prob(const at::Tensor& logits, const at::Tensor& x) {
  const LikelihoodIO io = prepare_likelihood(logits, x, c10::nullopt, 0.0, "logits");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::bernoulli_log_prob",
                             [&] { run<Kind::kBernoulliForward>(io.args<scalar_t>()); });
  return io.out;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad, const at::Tensor& logits,
                                                               const at::Tensor& x, bool needs_grad_x) {
  const LikelihoodIO io = prepare_likelihood_backward(grad, logits, x, c10::nullopt, 0.0, needs_grad_x, "logits");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::bernoulli_log_prob_backward",
                             [&] { run<Kind::kBernoulliBackward>(io.args<scalar_t>()); });
  auto [grad_logits, unused, grad_x] = io.grads();
  return {grad_logits, grad_x};
}

at::Tensor gaussian_log_prob(const at::Tensor& mean, const at::Tensor& x, const c10::optional<at::Tensor>& logvar,
                             double logvar_value) {
  const LikelihoodIO io = prepare_likelihood(mean, x, logvar, logvar_value, "mean");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::gaussian_log_prob",
                             [&] { run<Kind::kGaussianForward>(io.args<scalar_t>()); });
  return io.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(const at::Tensor& grad,
                                                                          const at::Tensor& mean, const at::Tensor& x,
                                                                          const c10::optional<at::Tensor>& logvar,
                                                                          double logvar_value, bool needs_grad_x) {
  const LikelihoodIO io = prepare_likelihood_backward(grad, mean, x, logvar, logvar_value, needs_grad_x, "mean");
  AT_DISPATCH_FLOATING_TYPES(io.dtype, "fastvae::gaussian_log_prob_backward",
                             [&] { run<Kind::kGaussianBackward>(io.args<scalar_t>()); });
  return io.grads();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, CPU, m) {
  m.impl("bernoulli_log_prob", &bernoulli_log_prob);
  m.impl("bernoulli_log_prob_backward", &bernoulli_log_prob_backward);
  m.impl("gaussian_log_prob", &gaussian_log_prob);
  m.impl("gaussian_log_prob_backward", &gaussian_log_prob_backward);
}

}  // namespace cpu
}  // namespace fastvae
