// autograd.cpp: the autograd formulas of the fused ops, registered for every
// backend at the Autograd dispatch key.
//
// Why C++ and not torch.library.register_autograd in Python: for small latent
// layers (B=128, D=32) a Python autograd.Function costs more than the whole
// fused kernel. Each backward is an op of its own (with its own fake in
// fastvae/ops.py), so torch.compile and AOTAutograd trace through this code.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <type_traits>

#include "fastvae.h"

namespace fastvae {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A first-order backward (grad mode off) calls the backward ops below the
// Autograd key: nothing is recorded there anyway, and skipping the autograd
// fallback saves microseconds that matter for small layers. With
// create_graph=True the Autograd key stays in, so double backward reports that
// it is not implemented instead of silently dropping the graph.
class BelowAutogradUnlessDoubleBackward {
 public:
  BelowAutogradUnlessDoubleBackward() {
    if (!at::GradMode::is_enabled()) guard_.emplace();
  }

 private:
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard_;
};

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

class LatentTerms : public torch::autograd::Function<LatentTerms> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                               const optional<Tensor>& eps, optional<int64_t> num_samples, int64_t seed,
                               int64_t offset, int64_t row_offset, bool stl) {
    static const auto op = find_op<LatentSig>("fastvae::latent_terms");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl, log_q, log_p] = op.call(mu, logvar, eps, num_samples, seed, offset, row_offset, stl);
    // eps is not saved: std*eps = z - mu (DESIGN.md section 1).
    ctx->save_for_backward({z, mu, logvar});
    ctx->saved_data["stl"] = stl;
    ctx->set_materialize_grads(false);
    return {z, kl, log_q, log_p};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LatentBackwardSig>("fastvae::latent_terms_backward");
    const auto saved = ctx->get_saved_variables();
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_mu, grad_logvar] =
        op.call(defined_or_none(grads[0]), defined_or_none(grads[1]), defined_or_none(grads[2]),
                defined_or_none(grads[3]), saved[0], saved[1], saved[2], ctx->saved_data["stl"].toBool());
    // eps is treated as data: no gradient flows to it.
    return {grad_mu, grad_logvar, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The handle of op "fastvae::<name>" (the name is copied by the lookup).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_fastvae_op(const char* name) {
  return find_op<Signature>((std::string("fastvae::") + name).c_str());
}

// Autograd of a one-parameter likelihood D (Bernoulli, continuous Bernoulli):
// gradients for the parameters and, when x requires it, for x.
template <class D>
class OneParamLogProb : public torch::autograd::Function<OneParamLogProb<D>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& params, const Tensor& x) {
    static const auto op = find_fastvae_op<OneParamSig>(D::kForwardOp);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({params, x});
    return op.call(params, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_fastvae_op<OneParamBackwardSig>(D::kBackwardOp);
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
    static const auto op = find_fastvae_op<TwoParamSig>(D::kForwardOp);
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({params, x, second.value_or(Tensor())});
    ctx->saved_data["second_value"] = second_value;
    return op.call(params, x, second, second_value);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_fastvae_op<TwoParamBackwardSig>(D::kBackwardOp);
    const auto saved = ctx->get_saved_variables();
    const bool needs_grad_x = ctx->needs_input_grad(1);
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_params, grad_second, grad_x] = op.call(grads[0], saved[0], saved[1], defined_or_none(saved[2]),
                                                      ctx->saved_data["second_value"].toDouble(), needs_grad_x);
    return {grad_params, needs_grad_x ? grad_x : Tensor(), saved[2].defined() ? grad_second : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> latent_terms_autograd(const Tensor& mu, const Tensor& logvar,
                                                                 const optional<Tensor>& eps, optional<int64_t> num_samples,
                                                                 int64_t seed, int64_t offset, int64_t row_offset,
                                                                 bool stl) {
  auto out = LatentTerms::apply(mu, logvar, eps, num_samples, seed, offset, row_offset, stl);
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
      m.impl(D::kForwardOp, &two_param_autograd<D>);
    } else {
      m.impl(D::kForwardOp, &one_param_autograd<D>);
    }
  });
}

}  // namespace fastvae
