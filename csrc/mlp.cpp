// mlp.cpp: the fused Linear/activation stack (csrc/mlp.h): its schemas, argument
// checks, the layer walks every device shares, the ATen elementwise passes, and
// its autograd (one node for the whole stack).
//
// A Linear layer is weights[i] (out_i, in_i) and biases[i] (out_i,) or None,
// followed by activations[i]; x is (..., in_0) and every leading dimension is a
// row of one matrix product (a view, no copy, for a contiguous x).
#include "mlp.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <algorithm>
#include <string>

#include "checks.h"
#include "dispatch.h"

namespace fastvae {
namespace mlp {
namespace {

using at::Tensor;
using at::TensorList;

constexpr int64_t kNumActivations = 4;

std::string indexed(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

Activation activation_at(at::IntArrayRef activations, size_t i) { return static_cast<Activation>(activations[i]); }

// x (..., in_0); weights[i] (out_i, in_i) with in_i = out_{i-1}; biases[i] (out_i,) or None;
// one activation code per layer; one floating dtype and one device for all.
void check_stack(const Tensor& x, TensorList weights, const Biases& biases, at::IntArrayRef activations) {
  check_floating(x, "x");
  const size_t layers = weights.size();
  TORCH_CHECK(layers >= 1, "fastvae: mlp needs at least one layer, got an empty weights list");
  TORCH_CHECK(biases.size() == layers, "fastvae: mlp: biases must hold one entry (a tensor or None) per layer, ",
              layers, ", got ", biases.size());
  TORCH_CHECK(activations.size() == layers, "fastvae: mlp: activations must hold one code per layer, ", layers,
              ", got ", activations.size());
  TORCH_CHECK(x.dim() >= 1, "fastvae: x must have shape (..., in_features), got a scalar");
  int64_t in = x.size(-1);
  for (size_t i = 0; i < layers; ++i) {
    const Tensor& w = weights[i];
    const std::string w_name = indexed("weights", i);
    check_same(w, x, w_name.c_str(), "x");
    TORCH_CHECK(w.dim() == 2 && w.size(1) == in, "fastvae: ", w_name, " must have shape (out_features, ", in,
                ") to match ", i == 0 ? std::string("x's last dimension") : indexed("weights", i - 1) + "'s rows",
                ", got ", w.sizes());
    const c10::optional<Tensor> b = biases.get(i);
    if (b.has_value()) {
      const std::string b_name = indexed("biases", i);
      check_same(*b, x, b_name.c_str(), "x");
      TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "fastvae: ", b_name, " must have shape (", w.size(0),
                  ",) (", w_name, "'s rows), got ", b->sizes());
    }
    TORCH_CHECK(activations[i] >= 0 && activations[i] < kNumActivations, "fastvae: activations[", i,
                "] must be 0 (identity), 1 (tanh), 2 (relu) or 3 (sigmoid), got ", activations[i]);
    in = w.size(0);
  }
}

// x's leading dimensions with `features` last.
std::vector<int64_t> output_shape(const Tensor& x, int64_t features) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = features;
  return shape;
}

int64_t rows_of(const Tensor& x) { return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1); }

Tensor as_rows(const Tensor& t, int64_t rows) { return t.reshape({rows, t.size(-1)}); }

// y (rows, out) = act(h W^T + b), y preallocated.
void layer_forward(const Elementwise& e, const Tensor& h, const Tensor& weight, const c10::optional<Tensor>& bias,
                   Activation act, Tensor y) {
  Tensor bias_for_pass;
  if (bias.has_value() && e.bias_in_gemm) {
    at::addmm_out(y, *bias, h, weight.t());
  } else {
    at::mm_out(y, h, weight.t());  // beta = 0: y's old contents are never read
    if (bias.has_value()) bias_for_pass = bias->contiguous();
  }
  if (bias_for_pass.defined() || act != Activation::kIdentity) e.bias_activation(y, bias_for_pass, act);
}

// The widest output among layers [0, layers).
int64_t widest(TensorList weights, size_t layers) {
  int64_t width = 0;
  for (size_t i = 0; i < layers; ++i) width = std::max(width, weights[i].size(0));
  return width;
}

// Room for `slots` (rows, width <= widest) matrices, and matrix `slot` of it shaped (rows, width).
struct Workspace {
  Tensor buffer;
  int64_t rows = 0;

  Workspace(const Tensor& like, int64_t slots, int64_t rows_, int64_t widest)
      : buffer(at::empty({slots, rows_ * widest}, like.options())), rows(rows_) {}

  Tensor matrix(int64_t slot, int64_t width) const {
    return buffer.select(0, slot).narrow(0, 0, rows * width).view({rows, width});
  }
};

}  // namespace

Tensor forward(const Elementwise& e, const Tensor& x, TensorList weights, const Biases& biases,
               at::IntArrayRef activations) {
  check_stack(x, weights, biases, activations);
  const size_t layers = weights.size();
  const int64_t rows = rows_of(x);
  Tensor y = at::empty(output_shape(x, weights[layers - 1].size(0)), x.options());
  // The hidden outputs take turns in two buffers: each is read once, by the next product.
  Workspace hidden(x, 2, rows, widest(weights, layers - 1));
  Tensor h = as_rows(x, rows);
  for (size_t i = 0; i < layers; ++i) {
    const int64_t out = weights[i].size(0);
    Tensor out_i = i + 1 == layers ? y.view({rows, out}) : hidden.matrix(i % 2, out);
    layer_forward(e, h, weights[i], biases.get(i), activation_at(activations, i), out_i);
    h = out_i;
  }
  return y;
}

std::vector<Tensor> forward_saving(const Elementwise& e, const Tensor& x, TensorList weights, const Biases& biases,
                                   at::IntArrayRef activations) {
  check_stack(x, weights, biases, activations);
  const int64_t rows = rows_of(x);
  std::vector<Tensor> outputs;
  outputs.reserve(weights.size());
  Tensor h = as_rows(x, rows);
  for (size_t i = 0; i < weights.size(); ++i) {
    outputs.push_back(at::empty(output_shape(x, weights[i].size(0)), x.options()));
    Tensor out_i = outputs.back().view({rows, weights[i].size(0)});
    layer_forward(e, h, weights[i], biases.get(i), activation_at(activations, i), out_i);
    h = out_i;
  }
  return outputs;
}

namespace {

// Which gradients mlp_backward computes: x, then each layer's weight and bias.
struct NeedsGrad {
  at::IntArrayRef flags;
  bool x() const { return flags[0] != 0; }
  bool weight(size_t i) const { return flags[1 + 2 * i] != 0; }
  bool bias(size_t i) const { return flags[2 + 2 * i] != 0; }
  bool layer(size_t i) const { return weight(i) || bias(i); }
};

// outputs: layer i's output (..., out_i) for every layer, the last one omitted when its
// activation is the identity (its derivative needs nothing); grad (..., out_last).
void check_backward(const Tensor& grad, const Tensor& x, TensorList weights, TensorList outputs,
                    at::IntArrayRef activations, at::IntArrayRef needs_grad) {
  check_stack(x, weights, Biases(std::vector<c10::optional<Tensor>>(weights.size())), activations);
  const size_t layers = weights.size();
  check_same(grad, x, "grad", "x");
  const auto grad_shape = output_shape(x, weights[layers - 1].size(0));
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(grad_shape), "fastvae: grad must have the output's shape ",
              at::IntArrayRef(grad_shape), ", got ", grad.sizes());
  const bool last_saved = activation_at(activations, layers - 1) != Activation::kIdentity;
  TORCH_CHECK(outputs.size() == layers - (last_saved ? 0 : 1), "fastvae: mlp_backward: outputs must hold every ",
              "layer's output (the last one only when its activation is not the identity): ",
              layers - (last_saved ? 0 : 1), " tensors, got ", outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const std::string name = indexed("outputs", i);
    check_same(outputs[i], x, name.c_str(), "x");
    const auto shape = output_shape(x, weights[i].size(0));
    TORCH_CHECK(outputs[i].sizes() == at::IntArrayRef(shape), "fastvae: ", name, " must have shape ",
                at::IntArrayRef(shape), ", got ", outputs[i].sizes());
  }
  TORCH_CHECK(needs_grad.size() == 1 + 2 * layers, "fastvae: mlp_backward: needs_grad must hold 1 + 2 * ",
              layers, " flags (x, then each layer's weight and bias), got ", needs_grad.size());
}

}  // namespace

GradsAll backward(const Elementwise& e, const Tensor& grad, const Tensor& x, TensorList weights, TensorList outputs,
                  at::IntArrayRef activations, at::IntArrayRef needs_grad) {
  check_backward(grad, x, weights, outputs, activations, needs_grad);
  const NeedsGrad needs{needs_grad};
  const size_t layers = weights.size();
  const int64_t rows = rows_of(x);
  Tensor grad_x;
  std::vector<Tensor> grad_weights(layers), grad_biases(layers);
  // Each gradient not asked for is its own empty tensor: outputs of an op must not alias.
  const auto result = [&]() -> GradsAll {
    const auto fill = [&](Tensor& t) {
      if (!t.defined()) t = at::empty({0}, x.options());
    };
    fill(grad_x);
    for (size_t i = 0; i < layers; ++i) {
      fill(grad_weights[i]);
      fill(grad_biases[i]);
    }
    return {grad_x, grad_weights, grad_biases};
  };
  // The walk stops at the lowest layer whose gradients, or whose input's, are asked for.
  size_t lowest = 0;
  while (!needs.x() && lowest < layers && !needs.layer(lowest)) ++lowest;
  if (lowest == layers) return result();

  // The gradient before each activation takes turns in two buffers with the
  // gradient of the layer's input computed from it.
  Workspace turns(x, 2, rows, widest(weights, layers));
  Tensor g = as_rows(grad, rows).contiguous();  // the gradient of layer i's output
  int64_t g_slot = -1;                          // which buffer holds g (-1: the incoming grad)
  for (size_t i = layers; i-- > lowest;) {
    const Activation act = activation_at(activations, i);
    const int64_t out = weights[i].size(0);
    // grad_pre = g * act'(.), in place over g when g is a buffer.
    int64_t pre_slot = g_slot;
    Tensor grad_pre = g;
    if (act != Activation::kIdentity && g_slot < 0) {
      pre_slot = 0;
      grad_pre = turns.matrix(0, out);
    }
    if (needs.bias(i)) grad_biases[i] = at::empty({out}, x.options());
    if (act != Activation::kIdentity || needs.bias(i)) {
      const Tensor y = act != Activation::kIdentity ? as_rows(outputs[i], rows) : Tensor();
      e.activation_grad(g, y, grad_pre, needs.bias(i) ? grad_biases[i] : Tensor(), act);
    }
    const Tensor input = i == 0 ? as_rows(x, rows) : as_rows(outputs[i - 1], rows);
    if (needs.weight(i)) grad_weights[i] = at::mm(grad_pre.t(), input);
    if (i == 0) {
      if (needs.x()) grad_x = at::mm(grad_pre, weights[0]).view(x.sizes());
    } else if (i > lowest) {  // the layers below need the gradient of this one's input
      g_slot = pre_slot == 0 ? 1 : 0;
      g = turns.matrix(g_slot, weights[i].size(1));
      at::mm_out(g, grad_pre, weights[i]);
    }
  }
  return result();
}

// ---------------------------------------------------------------------------
// The elementwise passes as ATen ops.
// ---------------------------------------------------------------------------
namespace {

void aten_bias_activation(const Tensor& y, const Tensor& bias, Activation act) {
  Tensor out = y;
  if (bias.defined()) out.add_(bias);
  switch (act) {
    case Activation::kTanh:
      out.tanh_();
      break;
    case Activation::kRelu:
      out.relu_();
      break;
    case Activation::kSigmoid:
      out.sigmoid_();
      break;
    case Activation::kIdentity:
      break;
  }
}

void aten_activation_grad(const Tensor& grad, const Tensor& y, const Tensor& grad_pre, const Tensor& grad_bias,
                          Activation act) {
  Tensor out = grad_pre;
  switch (act) {
    case Activation::kTanh:
      at::tanh_backward_out(out, grad, y);
      break;
    case Activation::kRelu:
      at::threshold_backward_out(out, grad, y, 0);
      break;
    case Activation::kSigmoid:
      at::sigmoid_backward_out(out, grad, y);
      break;
    case Activation::kIdentity:
      break;  // grad_pre is grad
  }
  if (grad_bias.defined()) {
    Tensor sums = grad_bias;
    const int64_t rows_dim = 0;
    at::sum_out(sums, grad_pre, at::IntArrayRef(rows_dim));
  }
}

}  // namespace

const Elementwise& aten_elementwise_cpu() {
  static const Elementwise passes{false, &aten_bias_activation, &aten_activation_grad};
  return passes;
}

const Elementwise& aten_elementwise_cuda() {
  static const Elementwise passes{true, &aten_bias_activation, &aten_activation_grad};
  return passes;
}

// ---------------------------------------------------------------------------
// Autograd: one node for the whole stack.
// ---------------------------------------------------------------------------
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using MlpSig = Tensor(const Tensor&, TensorList, const Biases&, at::IntArrayRef);
using MlpForwardSig = std::vector<Tensor>(const Tensor&, TensorList, const Biases&, at::IntArrayRef);
using MlpBackwardSig = GradsAll(const Tensor&, const Tensor&, TensorList, TensorList, at::IntArrayRef,
                                at::IntArrayRef);

// apply's inputs: x, the weights and the biases that are present (the tensors autograd
// connects to, in that order), then the biases list as the op takes it and the codes.
class FusedMlp : public torch::autograd::Function<FusedMlp> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList weights,
                               TensorList /*present_biases*/, const Biases& biases,
                               const std::vector<int64_t>& activations) {
    static const auto op = find_op<MlpForwardSig>("fastvae::mlp_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<Tensor> outputs = op.call(x, weights, biases, activations);
    const Tensor y = outputs.back();
    if (static_cast<Activation>(activations.back()) == Activation::kIdentity) outputs.pop_back();
    std::vector<Tensor> saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), outputs.begin(), outputs.end());
    ctx->save_for_backward(saved);
    std::vector<int64_t> has_bias;
    for (size_t i = 0; i < biases.size(); ++i) has_bias.push_back(biases.get(i).has_value());
    ctx->saved_data["activations"] = activations;
    ctx->saved_data["has_bias"] = has_bias;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<MlpBackwardSig>("fastvae::mlp_backward");
    TORCH_CHECK(!at::GradMode::is_enabled(), "fastvae: FusedMLP has no double backward (backward with "
                "create_graph=True); use the nn.Sequential it fuses");
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> activations = ctx->saved_data["activations"].toIntVector();
    const std::vector<int64_t> has_bias = ctx->saved_data["has_bias"].toIntVector();
    const size_t layers = activations.size();
    const TensorList all(saved);
    const TensorList weights = all.slice(1, layers), outputs = all.slice(1 + layers);
    // needs_input_grad counts the inputs autograd connects: x, the weights, the present biases.
    std::vector<int64_t> needs_grad{ctx->needs_input_grad(0)};
    size_t bias_edge = 1 + layers;
    for (size_t i = 0; i < layers; ++i) {
      needs_grad.push_back(ctx->needs_input_grad(1 + i));
      needs_grad.push_back(has_bias[i] ? ctx->needs_input_grad(bias_edge++) : false);
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_weights, grad_biases] = op.call(grads[0], saved[0], weights, outputs, activations, needs_grad);
    variable_list result{needs_grad[0] ? grad_x : Tensor()};
    for (size_t i = 0; i < layers; ++i) result.push_back(needs_grad[1 + 2 * i] ? grad_weights[i] : Tensor());
    for (size_t i = 0; i < layers; ++i) {
      if (has_bias[i]) result.push_back(needs_grad[2 + 2 * i] ? grad_biases[i] : Tensor());
    }
    result.resize(result.size() + 2);  // the biases list and the codes take no gradient
    return result;
  }
};

bool any_requires_grad(const Tensor& x, TensorList weights, const Biases& biases) {
  if (x.requires_grad()) return true;
  for (const Tensor& w : weights) {
    if (w.requires_grad()) return true;
  }
  for (size_t i = 0; i < biases.size(); ++i) {
    const c10::optional<Tensor> b = biases.get(i);
    if (b.has_value() && b->requires_grad()) return true;
  }
  return false;
}

// Outside training nothing is saved: the plain op keeps only two hidden buffers.
Tensor mlp_autograd(const Tensor& x, TensorList weights, const Biases& biases, at::IntArrayRef activations) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(x, weights, biases)) {
    static const auto op = find_op<MlpSig>("fastvae::mlp");
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, weights, biases, activations);
  }
  std::vector<Tensor> present_biases;
  for (size_t i = 0; i < biases.size(); ++i) {
    const c10::optional<Tensor> b = biases.get(i);
    if (b.has_value()) present_biases.push_back(*b);
  }
  return FusedMlp::apply(x, weights, TensorList(present_biases), biases, activations.vec())[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvae, m) {
  // The fakes (fastvae/ops/_mlp.py): where the dispatcher finds them.
  m.set_python_module("fastvae.ops._mlp");
  // y = the stack applied to x (..., in): layer i computes act_i(h W_i^T + b_i);
  // activations: 0 identity, 1 tanh, 2 relu, 3 sigmoid.
  m.def("mlp(Tensor x, Tensor[] weights, Tensor?[] biases, int[] activations) -> Tensor");
  // The same, returning every layer's output: what the backward needs.
  m.def("mlp_forward(Tensor x, Tensor[] weights, Tensor?[] biases, int[] activations) -> Tensor[]");
  // outputs: mlp_forward's, the last one left out when its activation is the identity;
  // needs_grad: x, then each layer's weight and bias (0 for a missing bias).
  m.def(
      "mlp_backward(Tensor grad, Tensor x, Tensor[] weights, Tensor[] outputs, int[] activations, int[] needs_grad)"
      " -> (Tensor grad_x, Tensor[] grad_weights, Tensor[] grad_biases)");
}

TORCH_LIBRARY_IMPL(fastvae, Autograd, m) { m.impl("mlp", &mlp_autograd); }

}  // namespace mlp
}  // namespace fastvae
