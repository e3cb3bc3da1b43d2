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
using BernoulliSig = Tensor(const Tensor&, const Tensor&);
using BernoulliBackwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool);
using GaussianSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, double);
using GaussianBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const optional<Tensor>&, double, bool);

class LatentTerms : public torch::autograd::Function<LatentTerms> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& mu, const Tensor& logvar,
                               const optional<Tensor>& eps, optional<int64_t> num_samples, int64_t seed,
                               int64_t offset, int64_t row_offset, bool stl) {
    static const auto op = find_op<LatentSig>("fastvae::latent_terms");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [z, kl, log_q, log_p] = op.call(mu, logvar, eps, num_samples, seed, offset, row_offset, stl);
    // eps is not saved: std*eps = z - mu (docs/DESIGN.md section 1).
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

class BernoulliLogProb : public torch::autograd::Function<BernoulliLogProb> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& x) {
    static const auto op = find_op<BernoulliSig>("fastvae::bernoulli_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, x});
    return op.call(logits, x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<BernoulliBackwardSig>("fastvae::bernoulli_log_prob_backward");
    const auto saved = ctx->get_saved_variables();
    const bool needs_grad_x = ctx->needs_input_grad(1);
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_logits, grad_x] = op.call(grads[0], saved[0], saved[1], needs_grad_x);
    return {grad_logits, needs_grad_x ? grad_x : Tensor()};
  }
};

class GaussianLogProb : public torch::autograd::Function<GaussianLogProb> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& mean, const Tensor& x, const optional<Tensor>& logvar,
                        double logvar_value) {
    static const auto op = find_op<GaussianSig>("fastvae::gaussian_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({mean, x, logvar.value_or(Tensor())});
    ctx->saved_data["logvar_value"] = logvar_value;
    return op.call(mean, x, logvar, logvar_value);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<GaussianBackwardSig>("fastvae::gaussian_log_prob_backward");
    const auto saved = ctx->get_saved_variables();
    const bool needs_grad_x = ctx->needs_input_grad(1);
    BelowAutogradUnlessDoubleBackward guard;
    auto [grad_mean, grad_logvar, grad_x] = op.call(grads[0], saved[0], saved[1], defined_or_none(saved[2]),
                                                    ctx->saved_data["logvar_value"].toDouble(), needs_grad_x);
    return {grad_mean, needs_grad_x ? grad_x : Tensor(), saved[2].defined() ? grad_logvar : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> latent_terms_autograd(const Tensor& mu, const Tensor& logvar,
                                                                 const optional<Tensor>& eps, optional<int64_t> num_samples,
                                                                 int64_t seed, int64_t offset, int64_t row_offset,
                                                                 bool stl) {
  auto out = LatentTerms::apply(mu, logvar, eps, num_samples, seed, offset, row_offset, stl);
  return {out[0], out[1], out[2], out[3]};
}

Tensor bernoulli_log_prob_autograd(const Tensor& logits, const Tensor& x) {
  return BernoulliLogProb::apply(logits, x);
}

Tensor gaussian_log_prob_autograd(const Tensor& mean, const Tensor& x, const optional<Tensor>& logvar,
                                  double logvar_value) {
  return GaussianLogProb::apply(mean, x, logvar, logvar_value);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) {
  m.impl("latent_terms", &latent_terms_autograd);
  m.impl("bernoulli_log_prob", &bernoulli_log_prob_autograd);
  m.impl("gaussian_log_prob", &gaussian_log_prob_autograd);
}

}  // namespace fastvae
