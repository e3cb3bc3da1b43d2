// priors_host.h: the host side of the prior ops that both backends share
// (csrc/cpu/priors.cpp, csrc/cuda/priors.cu); each backend supplies a Kernels struct
// with its loops, and these templates do the checks, layouts and ATen calls.
//
// gaussian_kl_prior and gaussian_log_density broadcast their operands without copying
// them where the broadcast is over leading dimensions only (the usual cases: z (L, B, D)
// against mu (B, D), a prior (D,) shared by every row): such an operand is read as
// contiguous (rows_i, D) rows, row r of the result reading row r % rows_i, and its
// gradient is summed over the rows that read it inside the kernel. Any other broadcast
// (an operand (B, 1, D) against (B, K, D), or a last dimension of 1) is expanded to a
// contiguous copy first and its gradient summed back with at::sum_to.
//
// mixture_log_prob never forms (N, K, D): log N(z_n; m_k, e^s_k) needs the quadratic
// form Q_nk = sum_d (z_nd - m_kd)^2 e^-s_kd, which is GEMM-shaped,
//   Q_nk = sum_d z_nd^2 e^-s_kd - 2 sum_d z_nd m_kd e^-s_kd + sum_d m_kd^2 e^-s_kd,
// so it costs two matmuls and per-component constants. Those terms can be far larger
// than Q itself (z close to a component whose variance is tiny): the GEMM's rounding,
// relative to bound_nk = sum_d (z_nd^2 + m_kd^2) e^-s_kd, would then swamp Q. Every pair
// whose bound exceeds mixture_cancellation_limit * (Q + 1) is flagged and its Q
// recomputed element by element (the Kernels). The backward is GEMMs of the
// responsibilities too, with the flagged pairs' terms taken out of the GEMMs and added
// exactly. What is saved for it is one (N, K) tensor: the responsibilities, negated
// where the pair was flagged (a responsibility is never negative, so the sign carries
// the flag without a second (N, K) tensor; a flagged pair whose responsibility is 0
// contributes nothing either way).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "host.h"
#include "priors.h"

namespace fastvae {

inline void check_prior_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastvae: ", name,
              " must be a float32 or float64 tensor, got ", t.scalar_type());
}

// ---------------------------------------------------------------------------
// Row-broadcast element ops
// ---------------------------------------------------------------------------
struct BroadcastOperand {
  at::Tensor rows_data;            // contiguous (rows, dim)
  int64_t rows;                    // row r of the result reads row r % rows
  std::vector<int64_t> expanded;   // non-empty: rows_data is a copy of this shape, sum its gradient back
};

struct RowBroadcast {
  std::vector<BroadcastOperand> operands;
  std::vector<int64_t> out_shape;  // the result's shape: the broadcast shape without its last dimension
  int64_t rows, dim;
};

inline std::vector<int64_t> shape_of(const at::Tensor& t) {
  return t.dim() == 0 ? std::vector<int64_t>{1} : t.sizes().vec();
}

// The broadcast shape of all operands, naming the first one that does not fit.
inline std::vector<int64_t> broadcast_shape(at::TensorList ts, const std::vector<const char*>& names) {
  std::vector<int64_t> full;
  for (size_t i = 0; i < ts.size(); ++i) {
    const std::vector<int64_t> shape = shape_of(ts[i]);
    std::vector<int64_t> merged(std::max(full.size(), shape.size()), 1);
    for (size_t j = 0; j < merged.size(); ++j) {
      const int64_t a = j < full.size() ? full[full.size() - 1 - j] : 1;
      const int64_t b = j < shape.size() ? shape[shape.size() - 1 - j] : 1;
      TORCH_CHECK(a == b || a == 1 || b == 1, "fastvae: ", names[i], " of shape ", ts[i].sizes(),
                  " does not broadcast against the shape ", at::IntArrayRef(full), " of ", names[0],
                  (i > 1 ? " and the arguments before it" : ""));
      merged[merged.size() - 1 - j] = a == 1 ? b : a;
    }
    full = std::move(merged);
  }
  return full;
}

inline void check_row_broadcast_inputs(at::TensorList ts, const std::vector<const char*>& names) {
  check_prior_dtype(ts[0], names[0]);
  for (size_t i = 1; i < ts.size(); ++i) check_same(ts[i], ts[0], names[i], names[0]);
}

inline RowBroadcast row_broadcast(at::TensorList ts, const std::vector<const char*>& names) {
  check_row_broadcast_inputs(ts, names);
  RowBroadcast b;
  std::vector<int64_t> full = broadcast_shape(ts, names);
  b.dim = full.back();
  b.out_shape.assign(full.begin(), full.end() - 1);
  b.rows = c10::multiply_integers(b.out_shape);
  for (const at::Tensor& t : ts) {
    std::vector<int64_t> lead = shape_of(t);
    const int64_t last = lead.back();
    lead.pop_back();
    size_t first = 0;
    while (first < lead.size() && lead[first] == 1) ++first;
    lead.erase(lead.begin(), lead.begin() + first);
    const bool suffix = lead.size() <= b.out_shape.size() &&
                        std::equal(lead.begin(), lead.end(), b.out_shape.end() - lead.size());
    BroadcastOperand op;
    if (suffix) {  // broadcast over leading dimensions only: read in place
      op.rows = c10::multiply_integers(lead);
      op.rows_data = t.reshape({op.rows, last});
      if (last != b.dim) {  // a last dimension of 1: copy it along the rows it has
        op.expanded = shape_of(t);
        op.expanded.back() = b.dim;
        op.rows_data = op.rows_data.expand({op.rows, b.dim});
      }
    } else {
      op.rows = b.rows;
      op.expanded = full;
      op.rows_data = t.expand(full).reshape({b.rows, b.dim});
    }
    op.rows_data = op.rows_data.contiguous();
    b.operands.push_back(std::move(op));
  }
  return b;
}

template <typename T, int N>
RowBroadcastArgs<T, N> row_broadcast_args(const RowBroadcast& b) {
  RowBroadcastArgs<T, N> a{};
  for (int i = 0; i < N; ++i) {
    a.in[i] = b.operands[i].rows_data.data_ptr<T>();
    a.in_rows[i] = b.operands[i].rows;
  }
  a.rows = b.rows;
  a.dim = b.dim;
  return a;
}

// Kernels::forward<Element, T>(args) writes args.out.
template <class Element, class Kernels>
at::Tensor row_broadcast_forward(at::TensorList ts, const std::vector<const char*>& names) {
  const RowBroadcast b = row_broadcast(ts, names);
  at::Tensor out = at::empty(b.out_shape, ts[0].options());
  AT_DISPATCH_FLOATING_TYPES(ts[0].scalar_type(), "fastvae::row_broadcast_forward", [&] {
    auto args = row_broadcast_args<scalar_t, Element::kOperands>(b);
    args.out = out.data_ptr<scalar_t>();
    if (b.rows > 0) Kernels::template forward<Element, scalar_t>(args);
  });
  return out;
}

// The gradient of every operand whose needs_grad is set (an empty (0,) tensor for the
// others), one Kernels::backward_pass per distinct row count among them.
template <class Element, class Kernels>
std::vector<at::Tensor> row_broadcast_backward(const at::Tensor& grad, at::TensorList ts,
                                               const std::vector<const char*>& names,
                                               const std::array<bool, Element::kOperands>& needs_grad) {
  constexpr int N = Element::kOperands;
  const RowBroadcast b = row_broadcast(ts, names);
  check_same(grad, ts[0], "grad", names[0]);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(b.out_shape), "fastvae: grad must have the result's shape ",
              at::IntArrayRef(b.out_shape), ", got ", grad.sizes());
  const at::Tensor grad_rows = grad.contiguous();
  // Each backward pass writes every element of the gradients it computes (the first
  // result row reading an element sets it), so they need no zero fill, unless there are
  // no result rows to read them.
  std::vector<at::Tensor> grads(N);
  for (int i = 0; i < N; ++i) {
    if (needs_grad[i]) {
      const std::vector<int64_t> shape{b.operands[i].rows, b.dim};
      grads[i] = b.rows > 0 ? at::empty(shape, ts[0].options()) : at::zeros(shape, ts[0].options());
    }
  }
  AT_DISPATCH_FLOATING_TYPES(ts[0].scalar_type(), "fastvae::row_broadcast_backward", [&] {
    std::vector<int64_t> done;
    for (int i = 0; i < N; ++i) {
      const int64_t pass_rows = b.operands[i].rows;
      if (!needs_grad[i] || std::find(done.begin(), done.end(), pass_rows) != done.end()) continue;
      done.push_back(pass_rows);
      auto args = row_broadcast_args<scalar_t, N>(b);
      args.grad = grad_rows.data_ptr<scalar_t>();
      args.pass_rows = pass_rows;
      for (int j = 0; j < N; ++j) {
        args.grad_in[j] = needs_grad[j] && b.operands[j].rows == pass_rows ? grads[j].data_ptr<scalar_t>() : nullptr;
      }
      if (b.rows > 0 && b.dim > 0) Kernels::template backward_pass<Element, scalar_t>(args);
    }
  });
  for (int i = 0; i < N; ++i) {
    if (!needs_grad[i]) {
      grads[i] = at::empty({0}, ts[0].options());
    } else if (!b.operands[i].expanded.empty()) {
      grads[i] = at::sum_to(grads[i].view(b.operands[i].expanded), ts[i].sizes()).contiguous();
    } else {
      grads[i] = grads[i].view(ts[i].sizes());
    }
  }
  return grads;
}

// ---------------------------------------------------------------------------
// Mixture of diagonal Gaussians
// ---------------------------------------------------------------------------
// A pair is recomputed exactly when its GEMM terms exceed its quadratic form (plus 1,
// the scale below which the log-density's absolute error is what counts) by this
// factor: at most 10 of float64's 53 bits, 4 of float32's 24 are lost to cancellation.
inline double mixture_cancellation_limit(at::ScalarType dtype) { return dtype == at::kDouble ? 1024.0 : 16.0; }

inline void check_mixture_inputs(const at::Tensor& z, const at::Tensor& means, const at::Tensor& logvars,
                                 const c10::optional<at::Tensor>& log_weights) {
  check_prior_dtype(z, "z");
  check_same(means, z, "means", "z");
  check_same(logvars, z, "logvars", "z");
  TORCH_CHECK(z.dim() >= 1, "fastvae: z must have shape (..., latent_dim), got a scalar");
  TORCH_CHECK(means.dim() == 2 && means.size(1) == z.size(-1), "fastvae: means must have shape (num_components, ",
              z.size(-1), ") to match z's last dimension, got ", means.sizes());
  TORCH_CHECK(means.size(0) >= 1, "fastvae: means must hold at least one component (num_components >= 1), got shape ",
              means.sizes());
  TORCH_CHECK(logvars.sizes() == means.sizes(), "fastvae: logvars must have the shape of means ", means.sizes(),
              ", got ", logvars.sizes());
  if (log_weights.has_value()) {
    check_same(*log_weights, z, "log_weights", "z");
    TORCH_CHECK(log_weights->dim() == 1 && log_weights->size(0) == means.size(0),
                "fastvae: log_weights must have shape (num_components,) = (", means.size(0), ",), got ",
                log_weights->sizes());
  }
}

inline std::vector<int64_t> mixture_result_shape(const at::Tensor& z) {
  return z.sizes().slice(0, z.dim() - 1).vec();
}

// log w_k: log_softmax(log_weights), or -log K for equal weights.
inline at::Tensor mixture_log_weights(const c10::optional<at::Tensor>& log_weights, const at::Tensor& means) {
  if (log_weights.has_value()) return at::log_softmax(*log_weights, 0);
  return at::full({means.size(0)}, -std::log(static_cast<double>(means.size(0))), means.options());
}

// (log_prob with z's leading shape, the signed responsibilities (..., K) or undefined).
// Kernels::recompute_flagged(Q, flagged, Z, means, inv_var) overwrites Q_nk with the
// exact sum for every flagged pair.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> mixture_forward(const at::Tensor& z, const at::Tensor& means,
                                                   const at::Tensor& logvars,
                                                   const c10::optional<at::Tensor>& log_weights, bool with_resp) {
  check_mixture_inputs(z, means, logvars, log_weights);
  const NoAutocast no_autocast;  // the matmuls stay in z's dtype
  const int64_t dim = z.size(-1), components = means.size(0);
  const at::Tensor Z = z.reshape({leading_rows(z), dim}).contiguous();
  const at::Tensor m = means.contiguous();
  const at::Tensor inv_var = at::exp(-logvars).contiguous();
  const at::Tensor scaled_means = m * inv_var;
  const at::Tensor bound = at::mm(Z * Z, inv_var.t()).add_((m * scaled_means).sum(1));  // (N, K)
  at::Tensor Q = at::addmm(bound, Z, scaled_means.t(), 1, -2);
  const at::Tensor flagged = at::gt(bound, (Q + 1) * mixture_cancellation_limit(z.scalar_type()));
  Kernels::recompute_flagged(Q, flagged, Z, m, inv_var);
  // log w_k + log N(z_n; m_k, e^s_k) = log w_k - 0.5 (sum_d s_kd + D log 2 pi) - 0.5 Q_nk
  const at::Tensor component_constant =
      mixture_log_weights(log_weights, m) - 0.5 * (logvars.sum(1) + static_cast<double>(dim) * kLog2Pi);
  const at::Tensor joint = Q.mul_(-0.5).add_(component_constant);
  const at::Tensor log_prob = at::logsumexp(joint, {1});
  std::vector<int64_t> resp_shape = mixture_result_shape(z);
  resp_shape.push_back(components);
  at::Tensor resp;
  if (with_resp) {
    resp = joint.sub_(log_prob.unsqueeze(1)).exp_();
    resp = at::where(flagged, -resp, resp).view(resp_shape);
  }
  return {log_prob.view(mixture_result_shape(z)), resp};
}

// Kernels::add_flagged_grads(resp, grad, Z, means, inv_var, grad_z, grad_means, grad_logvars)
// adds the exact terms of the flagged pairs (resp < 0), each weighted by grad_n |resp_nk|.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_backward(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& means, const at::Tensor& logvars,
    const c10::optional<at::Tensor>& log_weights, const at::Tensor& responsibilities) {
  check_mixture_inputs(z, means, logvars, log_weights);
  check_same(grad, z, "grad", "z");
  check_same(responsibilities, z, "responsibilities", "z");
  const std::vector<int64_t> result_shape = mixture_result_shape(z);
  std::vector<int64_t> resp_shape = result_shape;
  resp_shape.push_back(means.size(0));
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(result_shape), "fastvae: grad must have shape ",
              at::IntArrayRef(result_shape), ", got ", grad.sizes());
  TORCH_CHECK(responsibilities.sizes() == at::IntArrayRef(resp_shape), "fastvae: responsibilities must have shape ",
              at::IntArrayRef(resp_shape), ", got ", responsibilities.sizes());
  const NoAutocast no_autocast;
  const int64_t dim = z.size(-1), components = means.size(0);
  const at::Tensor Z = z.reshape({leading_rows(z), dim}).contiguous();
  const at::Tensor m = means.contiguous();
  const at::Tensor resp = responsibilities.reshape({leading_rows(z), components}).contiguous();
  const at::Tensor g = grad.reshape({-1, 1}).contiguous();
  const at::Tensor inv_var = at::exp(-logvars).contiguous();
  const at::Tensor scaled_means = m * inv_var;
  const at::Tensor weighted = resp.abs() * g;                        // G_nk = grad_n r_nk
  const at::Tensor gemm_weighted = weighted.masked_fill(resp < 0, 0);  // the flagged pairs go exactly
  const at::Tensor column_sum = gemm_weighted.sum(0).unsqueeze(1);   // (K, 1)
  const at::Tensor weight_sum = weighted.sum(0);                     // (K): sum_n G_nk, flagged pairs too
  // d/dz_n = sum_k G_nk (m_k - z_n) e^-s_k
  at::Tensor grad_z = at::mm(gemm_weighted, scaled_means).sub_(Z * at::mm(gemm_weighted, inv_var));
  // d/dm_k = e^-s_k sum_n G_nk (z_n - m_k)
  const at::Tensor weighted_z = at::mm(gemm_weighted.t(), Z);  // (K, D)
  at::Tensor grad_means = inv_var * (weighted_z - m * column_sum);
  // d/ds_k = 0.5 sum_n G_nk ((z_n - m_k)^2 e^-s_k - 1)
  at::Tensor grad_logvars =
      0.5 * inv_var * (at::mm(gemm_weighted.t(), Z * Z) - 2 * m * weighted_z + m * m * column_sum) -
      0.5 * weight_sum.unsqueeze(1);
  Kernels::add_flagged_grads(resp, g, Z, m, inv_var, grad_z, grad_means, grad_logvars);
  // d/dlog_weights_k = sum_n grad_n (r_nk - w_k)
  at::Tensor grad_log_weights = at::empty({0}, z.options());
  if (log_weights.has_value()) {
    grad_log_weights = weight_sum - at::softmax(*log_weights, 0) * g.sum();
  }
  return {grad_z.view(z.sizes()), grad_means, grad_logvars, grad_log_weights};
}

// ---------------------------------------------------------------------------
// The kernels of every prior op for one backend, and their registration.
// ---------------------------------------------------------------------------
inline const std::vector<const char*> kKLPriorNames = {"mu", "logvar", "prior_mu", "prior_logvar"};
inline const std::vector<const char*> kLogDensityNames = {"z", "mu", "logvar"};

// Kernels::Guard(device): the device guard of the backend (NoDeviceGuard on the CPU).
template <class Kernels>
struct PriorOps {
  static at::Tensor gaussian_kl_prior(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& prior_mu,
                                      const at::Tensor& prior_logvar) {
    const typename Kernels::Guard guard(mu.device());
    return row_broadcast_forward<PriorKLElement, Kernels>({mu, logvar, prior_mu, prior_logvar}, kKLPriorNames);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_prior_backward(
      const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& prior_mu,
      const at::Tensor& prior_logvar, std::array<bool, 4> needs_grad) {
    const typename Kernels::Guard guard(mu.device());
    auto g = row_broadcast_backward<PriorKLElement, Kernels>(grad, {mu, logvar, prior_mu, prior_logvar},
                                                             kKLPriorNames, needs_grad);
    return {g[0], g[1], g[2], g[3]};
  }

  static at::Tensor gaussian_log_density(const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar) {
    const typename Kernels::Guard guard(z.device());
    return row_broadcast_forward<GaussianLogDensityElement, Kernels>({z, mu, logvar}, kLogDensityNames);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_density_backward(
      const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
      std::array<bool, 3> needs_grad) {
    const typename Kernels::Guard guard(z.device());
    auto g = row_broadcast_backward<GaussianLogDensityElement, Kernels>(grad, {z, mu, logvar}, kLogDensityNames,
                                                                        needs_grad);
    return {g[0], g[1], g[2]};
  }

  static at::Tensor mixture_log_prob(const at::Tensor& z, const at::Tensor& means, const at::Tensor& logvars,
                                     const c10::optional<at::Tensor>& log_weights) {
    const typename Kernels::Guard guard(z.device());
    return std::get<0>(mixture_forward<Kernels>(z, means, logvars, log_weights, /*with_resp=*/false));
  }

  static std::tuple<at::Tensor, at::Tensor> mixture_log_prob_forward(const at::Tensor& z, const at::Tensor& means,
                                                                     const at::Tensor& logvars,
                                                                     const c10::optional<at::Tensor>& log_weights) {
    const typename Kernels::Guard guard(z.device());
    return mixture_forward<Kernels>(z, means, logvars, log_weights, /*with_resp=*/true);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_log_prob_backward(
      const at::Tensor& grad, const at::Tensor& z, const at::Tensor& means, const at::Tensor& logvars,
      const c10::optional<at::Tensor>& log_weights, const at::Tensor& responsibilities) {
    const typename Kernels::Guard guard(z.device());
    return mixture_backward<Kernels>(grad, z, means, logvars, log_weights, responsibilities);
  }
};

// Inside TORCH_LIBRARY_IMPL(fastvae, <backend key>, m).
template <class Kernels>
void register_prior_kernels(torch::Library& m) {
  using Ops = PriorOps<Kernels>;
  m.impl("gaussian_kl_prior", &Ops::gaussian_kl_prior);
  m.impl("gaussian_kl_prior_backward", &Ops::gaussian_kl_prior_backward);
  m.impl("gaussian_log_density", &Ops::gaussian_log_density);
  m.impl("gaussian_log_density_backward", &Ops::gaussian_log_density_backward);
  m.impl("mixture_log_prob", &Ops::mixture_log_prob);
  m.impl("mixture_log_prob_forward", &Ops::mixture_log_prob_forward);
  m.impl("mixture_log_prob_backward", &Ops::mixture_log_prob_backward);
}

}  // namespace fastvae
