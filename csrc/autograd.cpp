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

// ---------------------------------------------------------------------------
// The fused decoder head.
// ---------------------------------------------------------------------------
namespace {

using FusedHeadSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, c10::string_view,
                            double, bool);
using FusedHeadWithGradsSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                         const optional<Tensor>&, const Tensor&,
                                                                         c10::string_view, double);
using FusedHeadBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const optional<Tensor>&, const Tensor&,
                                                                c10::string_view, double, bool, bool, bool);

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
                        const Tensor& x, c10::string_view likelihood, double logvar_value, bool precompute_grads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["likelihood"] = std::string(likelihood);
    ctx->saved_data["logvar_value"] = logvar_value;
    const Tensor bias_or_undefined = bias.value_or(Tensor());
    if (precompute_grads) {
      static const auto op = find_op<FusedHeadWithGradsSig>("fastvae::fused_head_log_prob_with_grads");
      auto [log_prob, grad_h, grad_weight, grad_bias] = op.call(h, weight, bias, x, likelihood, logvar_value);
      ctx->save_for_backward({h, weight, bias_or_undefined, x, grad_h, grad_weight, grad_bias});
      return log_prob;
    }
    static const auto op = find_op<FusedHeadSig>("fastvae::fused_head_log_prob");
    ctx->save_for_backward({h, weight, bias_or_undefined, x});
    return op.call(h, weight, bias, x, likelihood, logvar_value, false);
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
                                  logvar_value, needs_h, needs_weight, needs_bias);
      if (needs_h) grad_h = gh;
      if (needs_weight) grad_weight = gw;
      if (needs_bias) grad_bias = gb;
    }
    return {grad_h, grad_weight, grad_bias, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Outside training (no grad mode, or nothing to differentiate) the op runs
// below autograd: nothing is saved and no gradient is computed or allocated.
Tensor fused_head_log_prob_autograd(const Tensor& h, const Tensor& weight, const optional<Tensor>& bias,
                                    const Tensor& x, c10::string_view likelihood, double logvar_value,
                                    bool precompute_grads) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad()),
              "fastvae: fused_head_log_prob does not differentiate with respect to x (it is the data); detach x, "
              "or use the unfused path (output layer + likelihood op)");
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (h.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!needs_grad) {
    static const auto op = find_op<FusedHeadSig>("fastvae::fused_head_log_prob");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(h, weight, bias, x, likelihood, logvar_value, precompute_grads);
  }
  // The forward-computed gradients are only used after a check of the incoming
  // gradient that reads it on the host: a synchronization on a GPU, impossible
  // while torch.compile traces. There the backward always recomputes.
  return FusedHead::apply(h, weight, bias, x, likelihood, logvar_value, precompute_grads && holds_its_values(h));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) { m.impl("fused_head_log_prob", &fused_head_log_prob_autograd); }

}  // namespace fastvae
