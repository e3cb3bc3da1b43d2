// ops.cpp: the schema of every fastvae op, and nothing else.
//
// The kernels live in cpu/ and cuda/ (TORCH_LIBRARY_IMPL per dispatch key),
// the autograd formulas in autograd.cpp, and the fake (meta) implementations
// used by torch.compile in fastvae/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(fastvae, m) {
  // Fakes are registered from Python; tell the dispatcher where to find them.
  m.set_python_module("fastvae.ops");

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
  m.def(
      "latent_terms_backward(Tensor? grad_z, Tensor? grad_kl, Tensor? grad_log_q, Tensor? grad_log_p,"
      " Tensor z, Tensor mu, Tensor logvar, bool stl) -> (Tensor grad_mu, Tensor grad_logvar)");

  // Per-row sums of log p(x|params): params (L,B,P) or (B,P), x (B,P). The
  // kernels of every likelihood come from its traits in csrc/fastvae.h.
  m.def("bernoulli_log_prob(Tensor logits, Tensor x) -> Tensor");
  m.def(
      "bernoulli_log_prob_backward(Tensor grad, Tensor logits, Tensor x, bool needs_grad_x)"
      " -> (Tensor grad_logits, Tensor grad_x)");
  m.def("gaussian_log_prob(Tensor mean, Tensor x, Tensor? logvar, float logvar_value) -> Tensor");
  m.def(
      "gaussian_log_prob_backward(Tensor grad, Tensor mean, Tensor x, Tensor? logvar, float logvar_value,"
      " bool needs_grad_x) -> (Tensor grad_mean, Tensor grad_logvar, Tensor grad_x)");

  // Continuous Bernoulli from logits, x in [0, 1].
  m.def("continuous_bernoulli_log_prob(Tensor logits, Tensor x) -> Tensor");
  m.def(
      "continuous_bernoulli_log_prob_backward(Tensor grad, Tensor logits, Tensor x, bool needs_grad_x)"
      " -> (Tensor grad_logits, Tensor grad_x)");
  // Discretized logistic over the 256 levels k/255 of x; log_scale a tensor, or
  // None and the single value log_scale_value.
  m.def("discretized_logistic_log_prob(Tensor mean, Tensor x, Tensor? log_scale, float log_scale_value) -> Tensor");
  m.def(
      "discretized_logistic_log_prob_backward(Tensor grad, Tensor mean, Tensor x, Tensor? log_scale,"
      " float log_scale_value, bool needs_grad_x) -> (Tensor grad_mean, Tensor grad_log_scale, Tensor grad_x)");
}
