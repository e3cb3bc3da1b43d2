// dispatch.h: what the autograd wrappers (csrc/autograd.cpp, csrc/priors_ops.cpp,
// csrc/mlp.cpp) share for calling the registered ops through the dispatcher.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>

namespace fastvae {

// The typed handle of a registered op, e.g. find_op<Sig>("fastvae::latent_terms").
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

}  // namespace fastvae
