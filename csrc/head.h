// head.h: the fused decoder head, shared by csrc/cpu/head.cpp and csrc/cuda/head.cu.
//
// The head is the decoder's output layer followed by the reconstruction
// log-likelihood: raw = h W^T + b, then log p(x | raw) summed over the pixels
// of each row. Row r of h (sample l, example b, r = l*B + b) is scored against
// x[b]. Both backends process the rows in chunks: a chunk's raw outputs are
// computed by a matrix product into a small buffer, turned in place into the
// row sums and (when gradients are wanted) into g_r * d log p / d raw, and that
// gradient is contracted at once into grad_h (rows of the chunk), grad_weight
// and grad_bias. The (L, B, k*P) raw outputs and their gradient never exist at
// full size.
//
// Layout of raw (as Decoder.to_output reads it): k = 1 parameter per pixel
// (Bernoulli logits, Gaussian means) or k = 2 (Gaussian with learned variance:
// columns [0, P) are means, [P, 2P) log-variances).
//
// This file holds what both backends share: the argument checks, the
// allocation of outputs, and the per-element math, which only combines the
// functions of fastvae.h.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "fastvae.h"
#include "host.h"

namespace fastvae {

enum class HeadLikelihood : int { kBernoulli = 0, kGaussian = 1, kGaussianLearned = 2 };

inline HeadLikelihood parse_head_likelihood(c10::string_view name) {
  if (name == c10::string_view("bernoulli")) return HeadLikelihood::kBernoulli;
  if (name == c10::string_view("gaussian")) return HeadLikelihood::kGaussian;
  if (name == c10::string_view("gaussian_learned")) return HeadLikelihood::kGaussianLearned;
  TORCH_CHECK(false, "fastvae: likelihood must be 'bernoulli', 'gaussian' or 'gaussian_learned', got '",
              std::string(name), "'");
}

inline int64_t head_params_per_element(HeadLikelihood kind) {
  return kind == HeadLikelihood::kGaussianLearned ? 2 : 1;
}

// ---------------------------------------------------------------------------
// Per-element math. `raw` holds h.W^T of one output (without the bias); with
// kGrads it is overwritten by g * d log p / d raw. Returns the element's
// log-probability (the Gaussian's -0.5*log(2 pi) is added once per row).
// ---------------------------------------------------------------------------
template <typename T, bool kLogProb, bool kGrads>
FASTVAE_FN T head_bernoulli_element(T& raw, T bias, T x, T g) {
  const T logit = raw + bias;
  const T log_prob = kLogProb ? bernoulli_log_prob(logit, x) : T(0);
  if (kGrads) raw = g * bernoulli_grad_logit(logit, x);
  return log_prob;
}

template <typename T, bool kLogProb, bool kGrads>
FASTVAE_FN T head_gaussian_element(T& raw, T bias, T x, T g, T logvar, T inv_var) {
  const T mean = raw + bias;
  const T log_prob = kLogProb ? gaussian_log_prob(mean, x, logvar, inv_var) : T(0);
  if (kGrads) {
    T grad_mean, unused;
    gaussian_grads(mean, x, inv_var, &grad_mean, &unused);
    raw = g * grad_mean;
  }
  return log_prob;
}

template <typename T, bool kLogProb, bool kGrads>
FASTVAE_FN T head_gaussian_learned_element(T& raw_mean, T& raw_logvar, T bias_mean, T bias_logvar, T x, T g) {
  const T mean = raw_mean + bias_mean;
  const T logvar = raw_logvar + bias_logvar;
  const T inv_var = exp_of(-logvar);
  const T log_prob = kLogProb ? gaussian_log_prob(mean, x, logvar, inv_var) : T(0);
  if (kGrads) {
    T grad_mean, grad_logvar;
    gaussian_grads(mean, x, inv_var, &grad_mean, &grad_logvar);
    raw_mean = g * grad_mean;
    raw_logvar = g * grad_logvar;
  }
  return log_prob;
}

// Added to each row sum: the Gaussian's normalizer, nothing for Bernoulli.
template <typename T>
FASTVAE_FN T head_row_constant(HeadLikelihood kind, int64_t pixels) {
  return kind == HeadLikelihood::kBernoulli ? T(0) : T(-0.5 * kLog2Pi) * static_cast<T>(pixels);
}

// ---------------------------------------------------------------------------
// Host side: checks and allocation.
// ---------------------------------------------------------------------------
// h: (L, B, H) or (B, H); weight: (k*P, H); bias: (k*P) or None; x: (B, P).
inline void check_head_inputs(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& x, HeadLikelihood kind) {
  check_floating(h, "h");
  check_same(weight, h, "weight", "h");
  check_same(x, h, "x", "h");
  TORCH_CHECK(x.dim() == 2, "fastvae: x must have shape (batch, num_pixels), got ", x.sizes());
  const bool stacked = h.dim() == 3 && h.size(1) == x.size(0);
  const bool single = h.dim() == 2 && h.size(0) == x.size(0);
  TORCH_CHECK(stacked || single, "fastvae: h must have shape (batch, hidden) or (num_samples, batch, hidden) with batch = ",
              x.size(0), " (x's first dimension), got ", h.sizes());
  const int64_t k = head_params_per_element(kind);
  const int64_t hidden = h.size(h.dim() - 1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == k * x.size(1) && weight.size(1) == hidden,
              "fastvae: weight must have shape (", k, " * num_pixels, hidden) = (", k * x.size(1), ", ", hidden,
              ") for this likelihood and these h and x, got ", weight.sizes());
  if (bias.has_value()) {
    check_same(*bias, h, "bias", "h");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastvae: bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
  }
}

template <typename T>
struct HeadArgs {
  const T* h;       // (rows, H)
  const T* weight;  // (k*P, H)
  const T* bias;    // (k*P), zeros when the layer has none
  const T* x;       // (B, P)
  const T* grad;    // (rows) incoming gradient, or nullptr: 1 for every row
  T* log_prob;      // (rows) or nullptr
  T* grad_h;        // (rows, H) or nullptr
  T* grad_weight;   // (k*P, H) or nullptr
  T* grad_bias;     // (k*P) or nullptr
  HeadLikelihood kind;
  T logvar_value, fixed_inv_var;  // HeadLikelihood::kGaussian
  int64_t rows, batch, pixels, hidden, outputs;  // outputs = k*P
};

// Inputs in the compute dtype, contiguous; outputs allocated (undefined when not wanted).
struct HeadIO {
  at::ScalarType h_dtype, dtype;
  HeadLikelihood kind;
  at::Tensor h, weight, bias, x, grad;
  at::Tensor log_prob, grad_h, grad_weight, grad_bias;
  bool has_bias;
  double logvar_value;
  int64_t rows, batch, pixels, hidden, outputs;

  template <typename T>
  HeadArgs<T> args() const {
    return {h.data_ptr<T>(),
            weight.data_ptr<T>(),
            bias.data_ptr<T>(),
            x.data_ptr<T>(),
            defined_ptr<T>(grad),
            defined_ptr<T>(log_prob),
            defined_ptr<T>(grad_h),
            defined_ptr<T>(grad_weight),
            defined_ptr<T>(grad_bias),
            kind,
            static_cast<T>(logvar_value),
            static_cast<T>(std::exp(-logvar_value)),
            rows,
            batch,
            pixels,
            hidden,
            outputs};
  }

  // grad_h, grad_weight, grad_bias in their inputs' dtypes; an empty (0,) tensor
  // for one not computed (and for grad_bias when the layer has no bias).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads() const {
    auto or_empty = [&](const at::Tensor& t) {
      return t.defined() ? as_dtype(t, h_dtype) : at::empty({0}, h.options().dtype(h_dtype));
    };
    return {or_empty(grad_h), or_empty(grad_weight), has_bias ? or_empty(grad_bias) : or_empty(at::Tensor())};
  }
};

// What to compute: the row sums, and which gradients.
struct HeadWants {
  bool log_prob, grad_h, grad_weight, grad_bias;
  bool any_grad() const { return grad_h || grad_weight || grad_bias; }
};

inline HeadIO prepare_head(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& x, c10::string_view likelihood, double logvar_value,
                           const c10::optional<at::Tensor>& grad, HeadWants wants) {
  HeadIO io;
  io.kind = parse_head_likelihood(likelihood);
  check_head_inputs(h, weight, bias, x, io.kind);
  TORCH_CHECK(std::isfinite(logvar_value), "fastvae: logvar_value must be finite, got ", logvar_value);
  io.h_dtype = h.scalar_type();
  io.dtype = sum_dtype(io.h_dtype);
  io.batch = x.size(0);
  io.pixels = x.size(1);
  io.hidden = h.size(h.dim() - 1);
  io.outputs = weight.size(0);
  io.rows = h.dim() == 3 ? h.size(0) * h.size(1) : h.size(0);
  io.h = contiguous_as(h, io.dtype).view({io.rows, io.hidden});
  io.weight = contiguous_as(weight, io.dtype);
  io.has_bias = bias.has_value();
  io.bias = io.has_bias ? contiguous_as(*bias, io.dtype) : at::zeros({io.outputs}, io.weight.options());
  io.x = contiguous_as(x, io.dtype);
  io.logvar_value = logvar_value;
  const auto row_shape = h.sizes().slice(0, h.dim() - 1);  // (L, B) or (B)
  if (grad.has_value()) {
    check_on_device(grad, h, "grad", "h");
    TORCH_CHECK(grad->sizes() == row_shape, "fastvae: grad must have shape ", row_shape, ", got ", grad->sizes());
    io.grad = contiguous_as(*grad, io.dtype);
  }
  const auto options = io.h.options();
  if (wants.log_prob) io.log_prob = at::empty(row_shape, options);
  if (wants.grad_h) io.grad_h = at::empty(h.sizes(), options);
  // Accumulated over chunks (and over threads on CPU): they start at zero.
  if (wants.grad_weight) io.grad_weight = at::zeros({io.outputs, io.hidden}, options);
  if (wants.grad_bias && io.has_bias) io.grad_bias = at::zeros({io.outputs}, options);
  return io;
}

// The three head ops on one backend, which supplies Backend::compute(io, wants) (the chunked
// loop over the rows) and Backend::Guard(device) (makes the inputs' device current). The
// checks, the allocation and the outputs are shared here, as LikelihoodOps does for the
// likelihoods (host.h).
template <class Backend>
struct HeadOps {
  static at::Tensor log_prob(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& x, c10::string_view likelihood, double logvar_value,
                             bool /*precompute_grads: autograd only*/) {
    const typename Backend::Guard guard(h.device());
    const HeadWants wants{true, false, false, false};
    const HeadIO io = prepare_head(h, weight, bias, x, likelihood, logvar_value, c10::nullopt, wants);
    Backend::compute(io, wants);
    return io.log_prob;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_with_grads(
      const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& x,
      c10::string_view likelihood, double logvar_value) {
    const typename Backend::Guard guard(h.device());
    const HeadWants wants{true, true, true, true};
    const HeadIO io = prepare_head(h, weight, bias, x, likelihood, logvar_value, c10::nullopt, wants);
    Backend::compute(io, wants);
    auto [grad_h, grad_weight, grad_bias] = io.grads();
    return {io.log_prob, grad_h, grad_weight, grad_bias};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      const at::Tensor& x, c10::string_view likelihood, double logvar_value, bool needs_grad_h,
      bool needs_grad_weight, bool needs_grad_bias) {
    const typename Backend::Guard guard(h.device());
    const HeadWants wants{false, needs_grad_h, needs_grad_weight, needs_grad_bias};
    const HeadIO io = prepare_head(h, weight, bias, x, likelihood, logvar_value, grad, wants);
    if (wants.any_grad()) Backend::compute(io, wants);
    return io.grads();
  }

  template <class Library>
  static void register_kernels(Library& m) {
    m.impl("fused_head_log_prob", &log_prob);
    m.impl("fused_head_log_prob_with_grads", &log_prob_with_grads);
    m.impl("fused_head_log_prob_backward", &backward);
  }
};

}  // namespace fastvae
