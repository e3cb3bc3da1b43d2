// autograd.cpp: the autograd formulas of the fused ops, registered for every
// backend at the Autograd dispatch key.
//
// Why C++ and not torch.library.register_autograd in Python: for small latent
// layers (B=128, D=32) a Python autograd.Function costs more than the whole
// fused kernel. Each backward is an op of its own (with its own fake in
// fastvae/ops/_fakes.py), so torch.compile and AOTAutograd trace through this code.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "dispatch.h"
#include "fastvae.h"

namespace fastvae {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd hands undefined tensors for outputs that received no gradient.
optional<Tensor> defined_or_none(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

using LatentSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const optional<Tensor>&,
                                                             optional<int64_t>, int64_t, int64_t, int64_t, bool);
using LatentBackwardSig = std::tuple<Tensor, Tensor>(const optional<Tensor>&, const optional<Tensor>&,
                                                     const optional<Tensor>&, const optional<Tensor>&,
                                                     const Tensor&, const Tensor&, const Tensor&, bool);
// The two schema shapes of the likelihood ops (csrc/fastvae.h, "Fused likelihoods").
using OneParamSig = Tensor(const Tensor&, const Tensor&);
using OneParamBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool);
using TwoParamSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, double);
using TwoParamBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const optional<Tensor>&, double, bool);

using LatentFromGeneratorSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                          optional<int64_t>, const optional<at::Generator>&,
                                                                          int64_t, bool);

// What both latent ops save and how their gradient flows (the noise is data either way).
// eps is not saved: std*eps = z - mu (docs/DESIGN.md section 1).
variable_list save_latent_outputs(AutogradContext* ctx, std::tuple<Tensor, Tensor, Tensor, Tensor> out,
                                  const Tensor& mu, const Tensor& logvar, bool stl) {
  auto& [z, kl, log_q, log_p] = out;
  ctx->save_for_backward({z, mu, logvar});
  ctx->saved_data["stl"] = stl;
  ctx->set_materialize_grads(false);
  return {z, kl, log_q, log_p};
}

// grad_mu, grad_logvar, then `no_grad_inputs` undefined gradients for the other inputs.
variable_list latent_backward(AutogradContext* ctx, const variable_list& grads, size_t no_grad_inputs) {
  static const auto op = find_op<LatentBackwardSig>("fastvae::latent_terms_backward");
  const auto saved = ctx->get_saved_variables();
  BelowAutogradUnlessDoubleBackward guard;
  auto [grad_mu, grad_logvar] =
      op.call(defined_or_none(grads[0]), defined_or_none(grads[1]), defined_or_none(grads[2]),
              defined_or_none(grads[3]), saved[0], saved[1], saved[2], ctx->saved_data["stl"].toBool());
  variable_list result(2 + no_grad_inputs);
  result[0] = grad_mu;
  result[1] = grad_logvar;
  return result;
}

class LatentTerms : public torch::autograd::Function<LatentTerms> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                               const optional<Tensor>& eps, optional<int64_t> num_samples, int64_t seed,
                               int64_t offset, int64_t row_offset, bool stl) {
    static const auto op = find_op<LatentSig>("fastvae::latent_terms");
    at::AutoDispatchBelowADInplaceOrView guard;
    return save_latent_outputs(ctx, op.call(mu, logvar, eps, num_samples, seed, offset, row_offset, stl), mu,
                               logvar, stl);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return latent_backward(ctx, grads, /*eps, num_samples, seed, offset, row_offset, stl*/ 6);
  }
};

class LatentTermsFromGenerator : public torch::autograd::Function<LatentTermsFromGenerator> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                               optional<int64_t> num_samples, const optional<at::Generator>& generator,
                               int64_t row_offset, bool stl) {
    static const auto op = find_op<LatentFromGeneratorSig>("fastvae::latent_terms_from_generator");
    at::AutoDispatchBelowADInplaceOrView guard;
    return save_latent_outputs(ctx, op.call(mu, logvar, num_samples, generator, row_offset, stl), mu, logvar,
                               stl);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return latent_backward(ctx, grads, /*num_samples, generator, row_offset, stl*/ 4);
  }
};

// The handle of D's op "fastvae::<kName><suffix>" (the name is copied by the lookup).
template <typename Signature, class D>
c10::TypedOperatorHandle<Signature> find_likelihood_op(const char* suffix) {
  return find_op<Signature>(op_name<D>(suffix).c_str());
}

// Autograd of a one-parameter likelihood D (Bernoulli, continuous Bernoulli):
// gradients for the parameters and, when x requires it, for x.
template <class D>
class OneParamLogProb : public torch::autograd::Function<OneParamLogProb<D>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& params, const Tensor& x) {
    static const auto op = find_likelihood_op<OneParamSig, D>("_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({params, x});
    return op.call(params, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_likelihood_op<OneParamBackwardSig, D>("_log_prob_backward");
    const auto saved = ctx->get_saved_variables();
    const bool needs_grad_x = ctx->needs_input_grad(1);
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_params, grad_x] = op.call(grads[0], saved[0], saved[1], needs_grad_x);
    return {grad_params, needs_grad_x ? grad_x : Tensor()};
  }
};

// Autograd of a two-parameter likelihood D (Gaussian, discretized logistic):
// the second parameter is a tensor (it gets a gradient) or one float (it does not).
template <class D>
class TwoParamLogProb : public torch::autograd::Function<TwoParamLogProb<D>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& params, const Tensor& x, const optional<Tensor>& second,
                        double second_value) {
    static const auto op = find_likelihood_op<TwoParamSig, D>("_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({params, x, second.value_or(Tensor())});
    ctx->saved_data["second_value"] = second_value;
    return op.call(params, x, second, second_value);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_likelihood_op<TwoParamBackwardSig, D>("_log_prob_backward");
    const auto saved = ctx->get_saved_variables();
    const bool needs_grad_x = ctx->needs_input_grad(1);
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_params, grad_second, grad_x] = op.call(grads[0], saved[0], saved[1], defined_or_none(saved[2]),
                                                      ctx->saved_data["second_value"].toDouble(), needs_grad_x);
    return {grad_params, needs_grad_x ? grad_x : Tensor(), saved[2].defined() ? grad_second : Tensor(), Tensor()};
  }
};

using SparseInputLinearSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&);
using SparseInputLinearBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                        bool, bool, bool);

class SparseInputLinear : public torch::autograd::Function<SparseInputLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const optional<Tensor>& bias) {
    static const auto op = find_op<SparseInputLinearSig>("fastvae::sparse_input_linear");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return op.call(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<SparseInputLinearBackwardSig>("fastvae::sparse_input_linear_backward");
    const auto saved = ctx->get_saved_variables();
    const bool needs_x = ctx->needs_input_grad(0), needs_weight = ctx->needs_input_grad(1);
    // A bias of None is not an input autograd counts: asking about it would be out of range.
    const bool needs_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_x, grad_weight, grad_bias] = op.call(grads[0], saved[0], saved[1], needs_x, needs_weight, needs_bias);
    return {needs_x ? grad_x : Tensor(), needs_weight ? grad_weight : Tensor(), needs_bias ? grad_bias : Tensor()};
  }
};

Tensor sparse_input_linear_autograd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias) {
  return SparseInputLinear::apply(x, weight, bias);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> latent_terms_autograd(const Tensor& mu, const Tensor& logvar,
                                                                 const optional<Tensor>& eps, optional<int64_t> num_samples,
                                                                 int64_t seed, int64_t offset, int64_t row_offset,
                                                                 bool stl) {
  auto out = LatentTerms::apply(mu, logvar, eps, num_samples, seed, offset, row_offset, stl);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> latent_terms_from_generator_autograd(
    const Tensor& mu, const Tensor& logvar, optional<int64_t> num_samples, const optional<at::Generator>& generator,
    int64_t row_offset, bool stl) {
  auto out = LatentTermsFromGenerator::apply(mu, logvar, num_samples, generator, row_offset, stl);
  return {out[0], out[1], out[2], out[3]};
}

template <class D>
Tensor one_param_autograd(const Tensor& params, const Tensor& x) {
  return OneParamLogProb<D>::apply(params, x);
}

template <class D>
Tensor two_param_autograd(const Tensor& params, const Tensor& x, const optional<Tensor>& second,
                          double second_value) {
  return TwoParamLogProb<D>::apply(params, x, second, second_value);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) {
  m.impl("latent_terms", &latent_terms_autograd);
  for_each_likelihood(FusedLikelihoods{}, [&](auto* tag) {
    using D = std::remove_pointer_t<decltype(tag)>;
    if constexpr (has_second<D>()) {
      m.impl(op_name<D>("_log_prob").c_str(), &two_param_autograd<D>);
    } else {
      m.impl(op_name<D>("_log_prob").c_str(), &one_param_autograd<D>);
    }
  });
  m.impl("latent_terms_from_generator", &latent_terms_from_generator_autograd);
  m.impl("sparse_input_linear", &sparse_input_linear_autograd);
}

// ---------------------------------------------------------------------------
// The fused decoder head.
// ---------------------------------------------------------------------------
namespace {

using FusedHeadSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, c10::string_view,
                            double, bool, double, optional<double>);
using FusedHeadWithGradsSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                         const optional<Tensor>&, const Tensor&,
                                                                         c10::string_view, double, double,
                                                                         optional<double>);
using FusedHeadBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const optional<Tensor>&, const Tensor&,
                                                                c10::string_view, double, bool, bool, bool, double,
                                                                optional<double>);

// Whether t is an ordinary tensor whose values can be read on the host: not a
// fake, functional or symbolic-shaped tensor of torch.compile's tracing, where
// reading them is impossible (a data-dependent branch).
bool holds_its_values(const Tensor& t) {
  const auto keys = t.key_set();
  return t.device().is_cpu() && !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Functionalize) &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// Whether the incoming gradient is the same for every row, as it is for a loss
// that is a plain sum or mean of the rows (the analytic and Monte Carlo ELBOs).
// Only then do gradients computed in the forward for a gradient of 1 per row
// give grad_weight and grad_bias by one scaling. A NaN anywhere reads as "not
// the same", which takes the recomputing path and propagates it.
bool same_for_every_row(const Tensor& grad) {
  if (!holds_its_values(grad)) return false;
  if (grad.numel() <= 1) return true;
  const Tensor flat = grad.reshape(-1);
  return at::eq(flat, flat[0]).all().item<bool>();
}

// t (computed for a gradient of 1 per row) times that row gradient, in t's dtype.
Tensor times_row_grad(const Tensor& t, const Tensor& grad) {
  return at::mul(t, grad.unsqueeze(-1)).to(t.scalar_type());
}

Tensor times_scalar_grad(const Tensor& t, const Tensor& grad) {
  if (grad.numel() == 0) return t;  // no rows: t is zero
  return at::mul(t, grad.reshape(-1)[0]).to(t.scalar_type());
}

class FusedHead : public torch::autograd::Function<FusedHead> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& weight, const optional<Tensor>& bias,
                        const Tensor& x, c10::string_view likelihood, double logvar_value, bool precompute_grads,
                        double second_shift, optional<double> second_min) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["likelihood"] = std::string(likelihood);
    ctx->saved_data["logvar_value"] = logvar_value;
    ctx->saved_data["second_shift"] = second_shift;
    ctx->saved_data["second_min"] = second_min;
    const Tensor bias_or_undefined = bias.value_or(Tensor());
    if (precompute_grads) {
      static const auto op = find_op<FusedHeadWithGradsSig>("fastvae::fused_head_log_prob_with_grads");
      auto [log_prob, grad_h, grad_weight, grad_bias] =
          op.call(h, weight, bias, x, likelihood, logvar_value, second_shift, second_min);
      ctx->save_for_backward({h, weight, bias_or_undefined, x, grad_h, grad_weight, grad_bias});
      return log_prob;
    }
    static const auto op = find_op<FusedHeadSig>("fastvae::fused_head_log_prob");
    ctx->save_for_backward({h, weight, bias_or_undefined, x});
    return op.call(h, weight, bias, x, likelihood, logvar_value, false, second_shift, second_min);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<FusedHeadBackwardSig>("fastvae::fused_head_log_prob_backward");
    // The gradients below are not themselves differentiable in h and weight.
    TORCH_CHECK(!at::GradMode::is_enabled(), "fastvae: fused_head_log_prob has no double backward "
                "(backward with create_graph=True); use the unfused path (output layer + likelihood op)");
    const auto saved = ctx->get_saved_variables();
    const Tensor& grad = grads[0];
    bool needs_h = ctx->needs_input_grad(0), needs_weight = ctx->needs_input_grad(1);
    bool needs_bias = ctx->needs_input_grad(2) && saved[2].defined();
    const std::string likelihood = ctx->saved_data["likelihood"].toStringRef();
    const double logvar_value = ctx->saved_data["logvar_value"].toDouble();
    const double second_shift = ctx->saved_data["second_shift"].toDouble();
    const optional<double> second_min = ctx->saved_data["second_min"].toOptional<double>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor grad_h, grad_weight, grad_bias;
    if (saved.size() == 7) {  // precomputed for a gradient of 1 per row
      // Each row of h only reaches its own row sum: row scaling is exact for any incoming gradient.
      if (needs_h) grad_h = times_row_grad(saved[4], grad);
      needs_h = false;
      if (same_for_every_row(grad)) {
        if (needs_weight) grad_weight = times_scalar_grad(saved[5], grad);
        if (needs_bias) grad_bias = times_scalar_grad(saved[6], grad);
        needs_weight = needs_bias = false;
      }
    }
    if (needs_h || needs_weight || needs_bias) {
      auto [gh, gw, gb] = op.call(grad, saved[0], saved[1], defined_or_none(saved[2]), saved[3], likelihood,
                                  logvar_value, needs_h, needs_weight, needs_bias, second_shift, second_min);
      if (needs_h) grad_h = gh;
      if (needs_weight) grad_weight = gw;
      if (needs_bias) grad_bias = gb;
    }
    return {grad_h, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Outside training (no grad mode, or nothing to differentiate) the op runs
// below autograd: nothing is saved and no gradient is computed or allocated.
Tensor fused_head_log_prob_autograd(const Tensor& h, const Tensor& weight, const optional<Tensor>& bias,
                                    const Tensor& x, c10::string_view likelihood, double logvar_value,
                                    bool precompute_grads, double second_shift, optional<double> second_min) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad()),
              "fastvae: fused_head_log_prob does not differentiate with respect to x (it is the data); detach x, "
              "or use the unfused path (output layer + likelihood op)");
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (h.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!needs_grad) {
    static const auto op = find_op<FusedHeadSig>("fastvae::fused_head_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(h, weight, bias, x, likelihood, logvar_value, precompute_grads, second_shift, second_min);
  }
  // The forward-computed gradients are only used after a check of the incoming
  // gradient that reads it on the host: a synchronization on a GPU, impossible
  // while torch.compile traces. There the backward always recomputes.
  return FusedHead::apply(h, weight, bias, x, likelihood, logvar_value, precompute_grads && holds_its_values(h),
                          second_shift, second_min);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) { m.impl("fused_head_log_prob", &fused_head_log_prob_autograd); }

}  // namespace fastvae
