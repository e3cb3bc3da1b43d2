// priors_ops.cpp: the schemas of the prior ops and their autograd formulas (the
// kernels are in cpu/priors.cpp and cuda/priors.cu, the fakes in fastvae/ops/_priors.py).
//
// Each backward is an op of its own, so torch.compile traces through the autograd
// code here as it does for the ops of autograd.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "dispatch.h"

TORCH_LIBRARY_FRAGMENT(fastvae, m) {
  m.set_python_module("fastvae.ops._priors");

  // Per-row sums over the last dimension of KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)),
  // all four broadcast against each other (csrc/priors_host.h): the result has the
  // broadcast shape without its last dimension. needs_grad: which gradients to compute;
  // the others are empty (0,) tensors.
  m.def("gaussian_kl_prior(Tensor mu, Tensor logvar, Tensor prior_mu, Tensor prior_logvar) -> Tensor");
  m.def(
      "gaussian_kl_prior_backward(Tensor grad, Tensor mu, Tensor logvar, Tensor prior_mu, Tensor prior_logvar,"
      " bool[4] needs_grad) -> (Tensor grad_mu, Tensor grad_logvar, Tensor grad_prior_mu, Tensor grad_prior_logvar)");
  // Per-row sums of log N(z; mu, e^logvar), the three broadcast against each other.
  m.def("gaussian_log_density(Tensor z, Tensor mu, Tensor logvar) -> Tensor");
  m.def(
      "gaussian_log_density_backward(Tensor grad, Tensor z, Tensor mu, Tensor logvar, bool[3] needs_grad)"
      " -> (Tensor grad_z, Tensor grad_mu, Tensor grad_logvar)");
  // log sum_k w_k N(z; means_k, e^logvars_k) for z (..., D), means and logvars (K, D),
  // w = softmax(log_weights), or 1/K for None: (...). _forward also returns the
  // responsibilities (..., K) its backward takes, negated for the pairs computed
  // exactly (csrc/priors_host.h). grad_log_weights is empty (0,) for None.
  m.def("mixture_log_prob(Tensor z, Tensor means, Tensor logvars, Tensor? log_weights) -> Tensor");
  m.def(
      "mixture_log_prob_forward(Tensor z, Tensor means, Tensor logvars, Tensor? log_weights)"
      " -> (Tensor log_prob, Tensor responsibilities)");
  m.def(
      "mixture_log_prob_backward(Tensor grad, Tensor z, Tensor means, Tensor logvars, Tensor? log_weights,"
      " Tensor responsibilities) -> (Tensor grad_z, Tensor grad_means, Tensor grad_logvars, Tensor grad_log_weights)");
}

namespace fastvae {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <size_t N>
std::array<bool, N> input_grads_needed(AutogradContext* ctx) {
  std::array<bool, N> needs{};
  for (size_t i = 0; i < N; ++i) needs[i] = ctx->needs_input_grad(i);
  return needs;
}

// Undefined where autograd asked for no gradient (the op returned an empty placeholder).
template <size_t N>
variable_list wanted(const std::array<Tensor, N>& grads, const std::array<bool, N>& needs) {
  variable_list out(N);
  for (size_t i = 0; i < N; ++i) out[i] = needs[i] ? grads[i] : Tensor();
  return out;
}

using KLPriorSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
using KLPriorBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, const Tensor&,
                                                                      std::array<bool, 4>);

class GaussianKLPrior : public torch::autograd::Function<GaussianKLPrior> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar, const Tensor& prior_mu,
                        const Tensor& prior_logvar) {
    static const auto op = find_op<KLPriorSig>("fastvae::gaussian_kl_prior");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mu, logvar, prior_mu, prior_logvar});
    return op.call(mu, logvar, prior_mu, prior_logvar);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<KLPriorBackwardSig>("fastvae::gaussian_kl_prior_backward");
    const auto s = ctx->get_saved_variables();
    const auto needs = input_grads_needed<4>(ctx);
    BelowAutogradUnlessDoubleBackward guard;
    auto [a, b, c, d] = op.call(grads[0], s[0], s[1], s[2], s[3], needs);
    return wanted<4>({a, b, c, d}, needs);
  }
};

using LogDensitySig = Tensor(const Tensor&, const Tensor&, const Tensor&);
using LogDensityBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, std::array<bool, 3>);

class GaussianLogDensity : public torch::autograd::Function<GaussianLogDensity> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& mu, const Tensor& logvar) {
    static const auto op = find_op<LogDensitySig>("fastvae::gaussian_log_density");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({z, mu, logvar});
    return op.call(z, mu, logvar);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LogDensityBackwardSig>("fastvae::gaussian_log_density_backward");
    const auto s = ctx->get_saved_variables();
    const auto needs = input_grads_needed<3>(ctx);
    BelowAutogradUnlessDoubleBackward guard;
    auto [a, b, c] = op.call(grads[0], s[0], s[1], s[2], needs);
    return wanted<3>({a, b, c}, needs);
  }
};

using MixtureSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&);
using MixtureForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                     const optional<Tensor>&);
using MixtureBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, const optional<Tensor>&,
                                                                      const Tensor&);

// Saves the inputs (alive anyway) and the (..., K) responsibilities: never (..., K, D).
class MixtureLogProb : public torch::autograd::Function<MixtureLogProb> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& means, const Tensor& logvars,
                        const optional<Tensor>& log_weights) {
    static const auto op = find_op<MixtureForwardSig>("fastvae::mixture_log_prob_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [log_prob, resp] = op.call(z, means, logvars, log_weights);
    ctx->save_for_backward({z, means, logvars, log_weights.value_or(Tensor()), resp});
    return log_prob;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<MixtureBackwardSig>("fastvae::mixture_log_prob_backward");
    const auto s = ctx->get_saved_variables();
    // A log_weights of None is not an input autograd counts: asking about it would be out of range.
    std::array<bool, 4> needs{};
    for (size_t i = 0; i < (s[3].defined() ? 4 : 3); ++i) needs[i] = ctx->needs_input_grad(i);
    BelowAutogradUnlessDoubleBackward guard;
    const optional<Tensor> log_weights = s[3].defined() ? optional<Tensor>(s[3]) : c10::nullopt;
    auto [a, b, c, d] = op.call(grads[0], s[0], s[1], s[2], log_weights, s[4]);
    return wanted<4>({a, b, c, d}, needs);
  }
};

Tensor gaussian_kl_prior_autograd(const Tensor& mu, const Tensor& logvar, const Tensor& prior_mu,
                                  const Tensor& prior_logvar) {
  return GaussianKLPrior::apply(mu, logvar, prior_mu, prior_logvar);
}

Tensor gaussian_log_density_autograd(const Tensor& z, const Tensor& mu, const Tensor& logvar) {
  return GaussianLogDensity::apply(z, mu, logvar);
}

// Outside training nothing is saved and the responsibilities are not formed.
Tensor mixture_log_prob_autograd(const Tensor& z, const Tensor& means, const Tensor& logvars,
                                 const optional<Tensor>& log_weights) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (z.requires_grad() || means.requires_grad() || logvars.requires_grad() ||
                           (log_weights.has_value() && log_weights->requires_grad()));
  if (!needs_grad) {
    static const auto op = find_op<MixtureSig>("fastvae::mixture_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(z, means, logvars, log_weights);
  }
  return MixtureLogProb::apply(z, means, logvars, log_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) {
  m.impl("gaussian_kl_prior", &gaussian_kl_prior_autograd);
  m.impl("gaussian_log_density", &gaussian_log_density_autograd);
  m.impl("mixture_log_prob", &mixture_log_prob_autograd);
}

}  // namespace fastvae
