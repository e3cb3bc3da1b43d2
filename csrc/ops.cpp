// ops.cpp: the schema of every fastvae op, and nothing else (the likelihoods' are spelled
// from their traits by define_likelihood_ops below).
//
// The kernels live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL per dispatch key),
// the autograd formulas in autograd.cpp, and the fake (meta) implementations
// used by torch.compile in fastvae/ops/_fakes.py.
#include <torch/library.h>

#include <string>

#include "fastvae.h"

namespace {

// The schemas of fused likelihood D's two ops, spelled from its traits (csrc/fastvae.h:
// kName, kParamName, kSecondName). One parameter p:
//   NAME_log_prob(Tensor p, Tensor x) -> Tensor
//   NAME_log_prob_backward(Tensor grad, Tensor p, Tensor x, bool needs_grad_x) -> (Tensor grad_p, Tensor grad_x)
// Two, p and s (s a tensor shaped like p, or None and the one value s_value):
//   NAME_log_prob(Tensor p, Tensor x, Tensor? s, float s_value) -> Tensor
//   NAME_log_prob_backward(Tensor grad, Tensor p, Tensor x, Tensor? s, float s_value, bool needs_grad_x)
//       -> (Tensor grad_p, Tensor grad_s, Tensor grad_x)
template <class D>
void define_likelihood_ops(torch::Library& m) {
  const std::string name = D::kName, p = D::kParamName;
  std::string second_args, second_grad;
  if constexpr (fastvae::has_second<D>()) {
    const std::string s = D::kSecondName;
    second_args = ", Tensor? " + s + ", float " + s + "_value";
    second_grad = ", Tensor grad_" + s;
  }
  m.def((name + "_log_prob(Tensor " + p + ", Tensor x" + second_args + ") -> Tensor").c_str());
  m.def((name + "_log_prob_backward(Tensor grad, Tensor " + p + ", Tensor x" + second_args +
         ", bool needs_grad_x) -> (Tensor grad_" + p + second_grad + ", Tensor grad_x)")
            .c_str());
}

}  // namespace

TORCH_LIBRARY(fastvae, m) {
  // Fakes are registered from Python; tell the dispatcher where to find them.
  m.set_python_module("fastvae.ops._fakes");

  // z = mu + exp(0.5*logvar)*eps for num_samples = L draws, and the per-row
  // sums kl (B), log_q (L,B), log_p (L,B). num_samples=None: one draw and no
  // sample dimension (z (B,D), log_q and log_p (B)). eps: given, shaped like z,
  // or drawn from Philox keyed by (seed, offset); row_offset is the global index
  // of the first example (so a data-parallel shard draws its part of the global
  // batch's noise). stl only changes the backward.
  m.def(
      "latent_terms(Tensor mu, Tensor logvar, Tensor? eps, int? num_samples, int seed, int offset,"
      " int row_offset=0, bool stl=False)"
      " -> (Tensor z, Tensor kl, Tensor log_q, Tensor log_p)");
  // The same with the noise drawn from `generator` (None: the device's default) when the op
  // runs, the way torch's own random ops draw theirs: on CPU one seed, with offset 0; on
  // CUDA the generator's Philox state, which a CUDA graph capture records as a device-side
  // offset, so each replay draws fresh noise. Under torch.compile the draw is part of the
  // graph (no graph break); nondeterministic_seeded keeps the compiler from folding it away
  // or recomputing it in the backward.
  m.def(
      "latent_terms_from_generator(Tensor mu, Tensor logvar, int? num_samples, Generator? generator,"
      " int row_offset=0, bool stl=False) -> (Tensor z, Tensor kl, Tensor log_q, Tensor log_p)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "latent_terms_backward(Tensor? grad_z, Tensor? grad_kl, Tensor? grad_log_q, Tensor? grad_log_p,"
      " Tensor z, Tensor mu, Tensor logvar, bool stl) -> (Tensor grad_mu, Tensor grad_logvar)");

  // Rows `index` (B,) of probs (N, ...), each pixel replaced by a Bernoulli draw with the
  // pixel as probability: 1 where u < p (csrc/fastvae.h, "Binarization": u from Philox
  // keyed by (seed, row number in probs, pixel)), else 0. (B, ...), probs' dtype.
  // Dynamic binarization of a minibatch in the pass that gathers it.
  m.def("gather_bernoulli(Tensor probs, Tensor index, int seed) -> Tensor");

  // y = x weight^T + bias for x (..., in), weight (out, in): a linear layer whose
  // CPU kernel skips the zeros of x (csrc/cpu/sparse_linear.cpp), a fraction of a
  // dense product's work for binarized images. Gradients not computed are empty
  // (0,) tensors.
  m.def("sparse_input_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "sparse_input_linear_backward(Tensor grad, Tensor x, Tensor weight, bool needs_grad_x,"
      " bool needs_grad_weight, bool needs_grad_bias) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Per-row sums of log p(x|params): params (L,B,P) or (B,P), x (B,P), and their
  // backward; one line per fused likelihood, whose kernels (and fused head) come from
  // its traits in csrc/fastvae.h. Their arguments:
  define_likelihood_ops<fastvae::BernoulliLikelihood>(m);            // (logits, x)
  define_likelihood_ops<fastvae::GaussianLikelihood>(m);             // (mean, x, logvar?, logvar_value)
  define_likelihood_ops<fastvae::ContinuousBernoulliLikelihood>(m);  // (logits, x), x in [0, 1]
  // Over the 256 levels k/255 of x; log_scale a tensor, or None and the single value log_scale_value.
  define_likelihood_ops<fastvae::DiscretizedLogisticLikelihood>(m);  // (mean, x, log_scale?, log_scale_value)

  // The fused decoder head (csrc/head.h): per-row sums of log p(x | h W^T + b)
  // for h (L,B,H) or (B,H), weight (k*P,H), bias (k*P) or None, x (B,P);
  // likelihood is the name of any likelihood above ("bernoulli", "gaussian", ...:
  // csrc/fastvae.h, kName). k = 1: the layer gives the first parameter, and a
  // two-parameter likelihood takes logvar_value as its second for every pixel;
  // k = 2 (two-parameter likelihoods): P first parameters, then P raw outputs r of
  // the second, which is max(r + second_shift, second_min) (None: no bound). The
  // (L,B,k*P) outputs of the layer are never materialized. precompute_grads only
  // changes the autograd path: the forward then also computes the gradients for an
  // incoming gradient of 1 per row (_with_grads), and the backward scales them
  // when the incoming gradient is the same for every row; otherwise the
  // backward recomputes the layer chunk by chunk (_backward). x is data: no
  // gradient flows to it. Gradients not computed are empty (0,) tensors.
  m.def(
      "fused_head_log_prob(Tensor h, Tensor weight, Tensor? bias, Tensor x, str likelihood,"
      " float logvar_value=0., bool precompute_grads=False, float second_shift=0., float? second_min=None)"
      " -> Tensor");
  m.def(
      "fused_head_log_prob_with_grads(Tensor h, Tensor weight, Tensor? bias, Tensor x, str likelihood,"
      " float logvar_value, float second_shift=0., float? second_min=None)"
      " -> (Tensor log_prob, Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "fused_head_log_prob_backward(Tensor grad, Tensor h, Tensor weight, Tensor? bias, Tensor x, str likelihood,"
      " float logvar_value, bool needs_grad_h, bool needs_grad_weight, bool needs_grad_bias,"
      " float second_shift=0., float? second_min=None) -> (Tensor grad_h, Tensor grad_weight, Tensor grad_bias)");
}
