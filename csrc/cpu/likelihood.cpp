// CPU implementation of the fused reconstruction log-likelihood ops.
//
// The decoder output has one row per (sample l, example b): (L, B, P) or
// (B, P); x is (B, P) and is broadcast over l. Each row is summed over P in
// one pass. Backward writes the per-element gradient scaled by the row's
// incoming gradient, and (only when x needs it) the gradient for x summed over l.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "cpu_loops.h"

namespace fastvae {
namespace cpu {
namespace {

// Everything a likelihood loop needs. `logvar` is the Gaussian's per-element
// log-variance (nullptr: the single value `logvar_value` for every element).
template <typename T>
struct LikelihoodArgs {
  const T* params;  // logits or means, (rows, P)
  const T* x;       // (B, P)
  const T* logvar;  // (rows, P) or nullptr
  T logvar_value;
  const T* grad;    // (rows) incoming gradient, backward only
  T* out;           // forward: (rows); backward: grad_params (rows, P)
  T* grad_logvar;   // backward, Gaussian with a logvar tensor: (rows, P)
  T* grad_x;        // backward, when x requires grad: (B, P), else nullptr
  int64_t rows, batch, pixels;
};

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
  const T fixed_inv_var = exp_of(-a.logvar_value);
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
  const T fixed_inv_var = exp_of(-a.logvar_value);
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

template <Kind kKind>
FASTVAE_MULTIVERSION void run_f32(const LikelihoodArgs<float>& a, int64_t begin, int64_t end) {
  run_kind<kKind, float>(a, begin, end);
}

template <Kind kKind, typename T>
void run(const LikelihoodArgs<T>& a) {
  const bool backward = kKind == Kind::kBernoulliBackward || kKind == Kind::kGaussianBackward;
  // Forward splits rows; backward splits examples (each owns its grad_x row).
  const int64_t units = backward ? a.batch : a.rows;
  if (units == 0) return;
  const int64_t unit_len = backward ? (a.rows / std::max<int64_t>(a.batch, 1)) * a.pixels : a.pixels;
  parallel_rows(units, unit_len, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      run_f32<kKind>(a, begin, end);
    } else {
      run_kind<kKind, T>(a, begin, end);
    }
  });
}

at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// (L, B, P) or (B, P) params -> number of rows L*B; the output keeps params' leading shape.
at::Tensor row_output(const at::Tensor& params, at::ScalarType dtype) {
  return at::empty(params.sizes().slice(0, params.dim() - 1), params.options().dtype(dtype));
}

at::Tensor bernoulli_log_prob(const at::Tensor& logits_in, const at::Tensor& x_in) {
  check_likelihood_inputs(logits_in, x_in, "logits");
  const at::ScalarType dtype = sum_dtype(logits_in.scalar_type());
  const at::Tensor logits = contiguous_as(logits_in, dtype), x = contiguous_as(x_in, dtype);
  at::Tensor out = row_output(logits, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::bernoulli_log_prob", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = logits.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    a.rows = out.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    run<Kind::kBernoulliForward>(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad_in,
                                                               const at::Tensor& logits_in, const at::Tensor& x_in,
                                                               bool needs_grad_x) {
  check_likelihood_inputs(logits_in, x_in, "logits");
  const at::ScalarType dtype = sum_dtype(logits_in.scalar_type());
  const at::Tensor logits = contiguous_as(logits_in, dtype), x = contiguous_as(x_in, dtype);
  const at::Tensor grad = contiguous_as(grad_in, dtype);
  TORCH_CHECK(grad.numel() * x.size(1) == logits.numel(), "fastvae: grad must have shape ",
              logits.sizes().slice(0, logits.dim() - 1), ", got ", grad.sizes());
  at::Tensor grad_logits = at::empty_like(logits);
  at::Tensor grad_x = needs_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::bernoulli_log_prob_backward", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = logits.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.grad = grad.data_ptr<scalar_t>();
    a.out = grad_logits.data_ptr<scalar_t>();
    a.grad_x = needs_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    a.rows = grad.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    run<Kind::kBernoulliBackward>(a);
  });
  return {grad_logits.to(logits_in.scalar_type()), grad_x.to(x_in.scalar_type())};
}

c10::optional<at::Tensor> checked_logvar(const c10::optional<at::Tensor>& logvar, const at::Tensor& mean) {
  if (!logvar.has_value()) return c10::nullopt;
  check_same(*logvar, mean, "logvar", "mean");
  TORCH_CHECK(logvar->sizes() == mean.sizes(), "fastvae: logvar must have the shape of mean ", mean.sizes(),
              " (broadcast it first), got ", logvar->sizes());
  return logvar;
}

at::Tensor gaussian_log_prob(const at::Tensor& mean_in, const at::Tensor& x_in,
                             const c10::optional<at::Tensor>& logvar_in, double logvar_value) {
  check_likelihood_inputs(mean_in, x_in, "mean");
  const auto logvar_opt = checked_logvar(logvar_in, mean_in);
  const at::ScalarType dtype = sum_dtype(mean_in.scalar_type());
  const at::Tensor mean = contiguous_as(mean_in, dtype), x = contiguous_as(x_in, dtype);
  const at::Tensor logvar = logvar_opt ? contiguous_as(*logvar_opt, dtype) : at::Tensor();
  at::Tensor out = row_output(mean, dtype);
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::gaussian_log_prob", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = mean.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.logvar = logvar.defined() ? logvar.data_ptr<scalar_t>() : nullptr;
    a.logvar_value = static_cast<scalar_t>(logvar_value);
    a.out = out.data_ptr<scalar_t>();
    a.rows = out.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    run<Kind::kGaussianForward>(a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(
    const at::Tensor& grad_in, const at::Tensor& mean_in, const at::Tensor& x_in,
    const c10::optional<at::Tensor>& logvar_in, double logvar_value, bool needs_grad_x) {
  check_likelihood_inputs(mean_in, x_in, "mean");
  const auto logvar_opt = checked_logvar(logvar_in, mean_in);
  const at::ScalarType dtype = sum_dtype(mean_in.scalar_type());
  const at::Tensor mean = contiguous_as(mean_in, dtype), x = contiguous_as(x_in, dtype);
  const at::Tensor grad = contiguous_as(grad_in, dtype);
  TORCH_CHECK(grad.numel() * x.size(1) == mean.numel(), "fastvae: grad must have shape ",
              mean.sizes().slice(0, mean.dim() - 1), ", got ", grad.sizes());
  const at::Tensor logvar = logvar_opt ? contiguous_as(*logvar_opt, dtype) : at::Tensor();
  at::Tensor grad_mean = at::empty_like(mean);
  at::Tensor grad_logvar = logvar.defined() ? at::empty_like(logvar) : at::empty({0}, mean.options());
  at::Tensor grad_x = needs_grad_x ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae::gaussian_log_prob_backward", [&] {
    LikelihoodArgs<scalar_t> a{};
    a.params = mean.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.logvar = logvar.defined() ? logvar.data_ptr<scalar_t>() : nullptr;
    a.logvar_value = static_cast<scalar_t>(logvar_value);
    a.grad = grad.data_ptr<scalar_t>();
    a.out = grad_mean.data_ptr<scalar_t>();
    a.grad_logvar = logvar.defined() ? grad_logvar.data_ptr<scalar_t>() : nullptr;
    a.grad_x = needs_grad_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    a.rows = grad.numel();
    a.batch = x.size(0);
    a.pixels = x.size(1);
    run<Kind::kGaussianBackward>(a);
  });
  const at::ScalarType out_dtype = mean_in.scalar_type();
  return {grad_mean.to(out_dtype), grad_logvar.to(out_dtype), grad_x.to(x_in.scalar_type())};
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
