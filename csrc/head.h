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
// The likelihood is any traits struct of csrc/fastvae.h (FusedLikelihoods), chosen by
// its kName: the head runs the same element functions as the likelihood ops. Layout
// of raw (as Decoder.to_output reads it), k*P columns: k = 1, the parameter of each
// pixel (a two-parameter likelihood then takes its second parameter as one value,
// logvar_value, for every pixel), or, for a two-parameter likelihood only, k = 2:
// columns [0, P) the first parameter, [P, 2P) the second's raw output r, from which
// the second parameter is max(r + second_shift, second_min) (parameter-major, as a
// decoder emits len(params) values per pixel). Which one is read from weight's shape.
//
// This file holds what both backends share: the argument checks, the
// allocation of outputs, and the per-element math, which only calls the
// likelihood's traits.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "checks.h"
#include "fastvae.h"
#include "host.h"

namespace fastvae {

// What the element math needs besides the raw outputs: the second parameter when it is one
// value for every pixel (made once by D::second), or the transform of the layer's second half.
template <class D, typename T>
struct HeadSecond {
  typename D::template Second<T> fixed;
  T shift, min;
};

// ---------------------------------------------------------------------------
// Per-element math. raw[0] holds h.W^T of the element's first parameter (without the
// bias) and, with kLayerSecond, raw[P] that of its second; with kGrads they are
// overwritten by g * d log p / d raw. Returns the element's log-probability (D's row
// constant is added once per row). A second parameter clamped at second.min gets no
// gradient, as torch.clamp's backward gives none there.
// ---------------------------------------------------------------------------
template <class D, bool kLayerSecond, bool kLogProb, bool kGrads, typename T>
FASTVAE_FN T head_element(T* raw, const T* bias, int64_t P, T x, T g, const HeadSecond<D, T>& second) {
  const T param = raw[0] + bias[0];
  bool clamped = false;
  typename D::template Second<T> s = second.fixed;
  if constexpr (kLayerSecond) {
    const T shifted = raw[P] + bias[P] + second.shift;
    clamped = shifted < second.min;  // false for NaN, which then flows on
    s = D::second(clamped ? second.min : shifted);
  }
  const T log_prob = kLogProb ? D::log_prob(param, s, x) : T(0);
  if constexpr (kGrads) {
    const LikelihoodGrads<T> d = D::grads(param, s, x);
    raw[0] = g * d.param;
    if constexpr (kLayerSecond) raw[P] = clamped ? T(0) : g * d.second;
  }
  return log_prob;
}

// ---------------------------------------------------------------------------
// Host side: checks and allocation.
// ---------------------------------------------------------------------------
// Raw outputs per pixel that weight gives: 1, or 2 for a two-parameter likelihood reading its
// second parameter from the layer (csrc/fastvae.h, has_second). Anything else raises.
// h: (L, B, H) or (B, H); weight: (k*P, H); bias: (k*P) or None; x: (B, P).
template <class D>
int64_t check_head_inputs(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& x) {
  check_floating(h, "h");
  check_same(weight, h, "weight", "h");
  check_same(x, h, "x", "h");
  TORCH_CHECK(x.dim() == 2, "fastvae: x must have shape (batch, num_pixels), got ", x.sizes());
  const bool stacked = h.dim() == 3 && h.size(1) == x.size(0);
  const bool single = h.dim() == 2 && h.size(0) == x.size(0);
  TORCH_CHECK(stacked || single, "fastvae: h must have shape (batch, hidden) or (num_samples, batch, hidden) with batch = ",
              x.size(0), " (x's first dimension), got ", h.sizes());
  const int64_t pixels = x.size(1), hidden = h.size(h.dim() - 1);
  const bool shaped = weight.dim() == 2 && weight.size(1) == hidden;
  const int64_t k = shaped && weight.size(0) == pixels ? 1 : (shaped && weight.size(0) == 2 * pixels ? 2 : 0);
  if (has_second<D>()) {
    TORCH_CHECK(k > 0, "fastvae: weight must have shape (1 * num_pixels, hidden) = (", pixels, ", ", hidden,
                ") (", D::kSecondName, " one value) or (2 * num_pixels, hidden) = (", 2 * pixels, ", ", hidden, ") (",
                D::kSecondName, " from the layer) for this likelihood and these h and x, got ", weight.sizes());
  } else {
    TORCH_CHECK(k == 1, "fastvae: weight must have shape (1 * num_pixels, hidden) = (", pixels, ", ", hidden,
                ") for this likelihood and these h and x, got ", weight.sizes());
  }
  if (bias.has_value()) {
    check_same(*bias, h, "bias", "h");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastvae: bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
  }
  return k;
}

// The second parameter's arguments of the head ops (csrc/ops.cpp): its one value, and the
// transform of the layer's second half.
struct HeadSecondArgs {
  double value = 0.0;  // logvar_value
  double shift = 0.0;
  c10::optional<double> min;

  void check() const {
    TORCH_CHECK(std::isfinite(value), "fastvae: logvar_value must be finite, got ", value);
    TORCH_CHECK(std::isfinite(shift), "fastvae: second_shift must be finite, got ", shift);
    TORCH_CHECK(!min.has_value() || !std::isnan(*min), "fastvae: second_min must be a number or None, got nan");
  }
};

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
  T second_value, second_shift, second_min;  // HeadSecondArgs; second_min -inf for none
  bool layer_second;                         // k = 2
  int64_t rows, batch, pixels, hidden, outputs;  // outputs = k*P

  template <class D>
  FASTVAE_FN HeadSecond<D, T> second() const {
    return {D::second(second_value), second_shift, second_min};
  }
};

// Inputs in the compute dtype, contiguous; outputs allocated (undefined when not wanted).
struct HeadIO {
  at::ScalarType h_dtype, dtype;
  at::Tensor h, weight, bias, x, grad;
  at::Tensor log_prob, grad_h, grad_weight, grad_bias;
  bool has_bias, layer_second;
  HeadSecondArgs second;
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
            static_cast<T>(second.value),
            static_cast<T>(second.shift),
            second.min.has_value() ? static_cast<T>(*second.min) : -std::numeric_limits<T>::infinity(),
            layer_second,
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

template <class D>
HeadIO prepare_head(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& x, const HeadSecondArgs& second, const c10::optional<at::Tensor>& grad,
                    HeadWants wants) {
  HeadIO io;
  io.layer_second = check_head_inputs<D>(h, weight, bias, x) == 2;
  second.check();
  io.second = second;
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
  const auto row_shape = h.sizes().slice(0, h.dim() - 1);  // (L, B) or (B)
  if (grad.has_value()) {
    check_on_device(grad, h, "grad", "h");
    TORCH_CHECK(grad->sizes() == row_shape, "fastvae: grad must have shape ", row_shape, ", got ", grad->sizes());
    io.grad = contiguous_as(*grad, io.dtype);
  }
  const auto options = io.h.options();
  if (wants.log_prob) io.log_prob = at::empty(row_shape, options);
  if (wants.grad_h) io.grad_h = at::empty(h.sizes(), options);
  // Accumulated over chunks (and over threads on CPU). grad_weight is not zeroed where there
  // are rows: each backend's first GEMM into it has beta = 0 (a fill of the matrix saved).
  if (wants.grad_weight) {
    io.grad_weight = io.rows > 0 ? at::empty({io.outputs, io.hidden}, options)
                                 : at::zeros({io.outputs, io.hidden}, options);
  }
  if (wants.grad_bias && io.has_bias) io.grad_bias = at::zeros({io.outputs}, options);
  return io;
}

// The three head ops on one backend, which supplies Backend::compute<D>(io, wants) (the chunked
// loop over the rows, for likelihood D) and Backend::Guard(device) (makes the inputs' device
// current). The likelihood is looked up by name once per call (with_fused_likelihood); the
// checks, the allocation and the outputs are shared here, as LikelihoodOps does for the
// likelihoods (host.h).
template <class Backend>
struct HeadOps {
  // io for these arguments, with `compute` run on it when anything is wanted.
  static HeadIO run(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& x, c10::string_view likelihood, const HeadSecondArgs& second,
                    const c10::optional<at::Tensor>& grad, HeadWants wants) {
    const typename Backend::Guard guard(h.device());
    HeadIO io;
    with_fused_likelihood(likelihood, [&](auto* tag) {
      using D = std::remove_pointer_t<decltype(tag)>;
      io = prepare_head<D>(h, weight, bias, x, second, grad, wants);
      if (wants.log_prob || wants.any_grad()) Backend::template compute<D>(io, wants);
    });
    return io;
  }

  static at::Tensor log_prob(const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& x, c10::string_view likelihood, double logvar_value,
                             bool /*precompute_grads: autograd only*/, double second_shift,
                             c10::optional<double> second_min) {
    const HeadWants wants{true, false, false, false};
    return run(h, weight, bias, x, likelihood, {logvar_value, second_shift, second_min}, c10::nullopt, wants)
        .log_prob;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_with_grads(
      const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& x,
      c10::string_view likelihood, double logvar_value, double second_shift, c10::optional<double> second_min) {
    const HeadWants wants{true, true, true, true};
    const HeadIO io =
        run(h, weight, bias, x, likelihood, {logvar_value, second_shift, second_min}, c10::nullopt, wants);
    auto [grad_h, grad_weight, grad_bias] = io.grads();
    return {io.log_prob, grad_h, grad_weight, grad_bias};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      const at::Tensor& x, c10::string_view likelihood, double logvar_value, bool needs_grad_h,
      bool needs_grad_weight, bool needs_grad_bias, double second_shift, c10::optional<double> second_min) {
    const HeadWants wants{false, needs_grad_h, needs_grad_weight, needs_grad_bias};
    return run(h, weight, bias, x, likelihood, {logvar_value, second_shift, second_min}, grad, wants).grads();
  }

  template <class Library>
  static void register_kernels(Library& m) {
    m.impl("fused_head_log_prob", &log_prob);
    m.impl("fused_head_log_prob_with_grads", &log_prob_with_grads);
    m.impl("fused_head_log_prob_backward", &backward);
  }
};

}  // namespace fastvae
