// checks.h: argument validation shared by the CPU and CUDA implementations.
//
// Every op validates at the boundary, with a message that names the argument
// and what was expected, so that a direct torch.ops.fastvae.* call can never
// read out of bounds. The Python fakes (fastvae/ops/_fakes.py) mirror these checks
// for tracing.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastvae {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              "fastvae: ", name, " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
              t.scalar_type());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastvae: ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == ref.device(), "fastvae: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; they must be on the same device");
}

// Shape of z: (L, B, D), or (B, D) when num_samples is None.
inline std::vector<int64_t> latent_z_shape(const at::Tensor& mu, c10::optional<int64_t> num_samples) {
  if (!num_samples.has_value()) return {mu.size(0), mu.size(1)};
  return {*num_samples, mu.size(0), mu.size(1)};
}

// mu, logvar: (B, D); eps: shaped like z.
inline void check_latent_inputs(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& eps,
                                c10::optional<int64_t> num_samples) {
  check_floating(mu, "mu");
  check_same(logvar, mu, "logvar", "mu");
  TORCH_CHECK(mu.dim() == 2, "fastvae: mu must have shape (batch, latent_dim), got ", mu.sizes());
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "fastvae: logvar must have the shape of mu ", mu.sizes(), ", got ",
              logvar.sizes());
  TORCH_CHECK(num_samples.value_or(1) >= 1, "fastvae: num_samples must be >= 1, got ", num_samples.value_or(1));
  if (eps.has_value()) {
    check_same(*eps, mu, "eps", "mu");
    const auto z_shape = latent_z_shape(mu, num_samples);
    TORCH_CHECK(eps->sizes() == at::IntArrayRef(z_shape), "fastvae: eps must have the shape of z ", z_shape,
                " ((num_samples, batch, latent_dim), or (batch, latent_dim) when num_samples is None), got ",
                eps->sizes());
  }
}

inline void check_latent_backward_inputs(const c10::optional<at::Tensor>& grad_z,
                                         const c10::optional<at::Tensor>& grad_kl,
                                         const c10::optional<at::Tensor>& grad_log_q,
                                         const c10::optional<at::Tensor>& grad_log_p, const at::Tensor& z,
                                         const at::Tensor& mu, const at::Tensor& logvar) {
  check_latent_inputs(mu, logvar, c10::nullopt, c10::nullopt);
  check_same(z, mu, "z", "mu");
  const bool stacked = z.dim() == 3 && z.size(1) == mu.size(0) && z.size(2) == mu.size(1);
  TORCH_CHECK(stacked || z.sizes() == mu.sizes(),
              "fastvae: z must have shape (num_samples, batch, latent_dim) or (batch, latent_dim), got ", z.sizes());
  if (grad_z.has_value()) {
    TORCH_CHECK(grad_z->sizes() == z.sizes(), "fastvae: grad_z must have the shape of z ", z.sizes(), ", got ",
                grad_z->sizes());
  }
  const auto row_shape = z.sizes().slice(0, z.dim() - 1);  // (L, B) or (B)
  for (const auto* g : {&grad_log_q, &grad_log_p}) {
    if (g->has_value()) {
      TORCH_CHECK((*g)->sizes() == row_shape, "fastvae: grad_log_q/grad_log_p must have shape ", row_shape,
                  ", got ", (*g)->sizes());
    }
  }
  if (grad_kl.has_value()) {
    TORCH_CHECK(grad_kl->dim() == 1 && grad_kl->size(0) == mu.size(0),
                "fastvae: grad_kl must have shape (batch,), got ", grad_kl->sizes());
  }
}

// params: (L, B, P) or (B, P); x: (B, P).
inline void check_likelihood_inputs(const at::Tensor& params, const at::Tensor& x, const char* params_name) {
  check_floating(params, params_name);
  check_same(x, params, "x", params_name);
  TORCH_CHECK(x.dim() == 2, "fastvae: x must have shape (batch, num_pixels), got ", x.sizes());
  bool stacked = params.dim() == 3 && params.size(1) == x.size(0) && params.size(2) == x.size(1);
  bool single = params.sizes() == x.sizes();
  TORCH_CHECK(stacked || single, "fastvae: ", params_name, " must have shape (batch, num_pixels) = ", x.sizes(),
              " or (num_samples, batch, num_pixels), got ", params.sizes());
}

// gather_bernoulli: probs (N, ...) float32 or float64, index (B,) int64 on the same device.
inline void check_gather_bernoulli_inputs(const at::Tensor& probs, const at::Tensor& index) {
  TORCH_CHECK(probs.scalar_type() == at::kFloat || probs.scalar_type() == at::kDouble,
              "fastvae: probs must be float32 or float64, got ", probs.scalar_type());
  TORCH_CHECK(probs.dim() >= 1, "fastvae: probs must have a row dimension, got a scalar");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1,
              "fastvae: index must be a 1-D int64 tensor of row numbers, got ", index.scalar_type(), " of shape ",
              index.sizes());
  TORCH_CHECK(index.device() == probs.device(), "fastvae: index is on ", index.device(), " but probs is on ",
              probs.device(), "; they must be on the same device");
}

// sparse_input_linear: x (..., in), weight (out, in), bias (out,) or None, one
// floating dtype and device.
inline void check_sparse_input_linear_inputs(const at::Tensor& x, const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias) {
  check_floating(x, "x");
  check_same(weight, x, "weight", "x");
  TORCH_CHECK(x.dim() >= 1, "fastvae: x must have shape (..., in_features), got a scalar");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1), "fastvae: weight must have shape (out_features, ",
              x.size(-1), ") to match x's last dimension, got ", weight.sizes());
  if (bias.has_value()) {
    check_same(*bias, x, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastvae: bias must have shape (",
                weight.size(0), ",) (out_features), got ", bias->sizes());
  }
}

// sparse_input_linear_backward: grad shaped like the output, (..., out_features).
inline void check_sparse_input_linear_backward_inputs(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& weight) {
  check_sparse_input_linear_inputs(x, weight, c10::nullopt);
  check_same(grad, x, "grad", "x");
  std::vector<int64_t> expected = x.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(expected), "fastvae: grad must have the output's shape ",
              at::IntArrayRef(expected), ", got ", grad.sizes());
}

// Output dtype of per-row sums: float32 for half inputs (they accumulate in
// float32 and a half sum of hundreds of terms would lose the digits), else the input dtype.
inline at::ScalarType sum_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace fastvae
