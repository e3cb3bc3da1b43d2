"""Fake (meta) implementations of fastvae's ops: output shapes and dtypes without computing.

torch.compile and the meta device call these instead of the kernels. They run the same
argument checks as the kernels, so a bad call fails while tracing with the kernel's message.
Registered when the extension is loaded (fastvae.ops imports this module for that).
"""

from __future__ import annotations

import torch

from ._backend import backend
from ._checks import (
    _check_gather_bernoulli,
    _check_head,
    _check_latent,
    _check_likelihood,
    _check_sparse_input_linear,
    _sum_dtype,
    _z_shape,
)


def register_likelihood_fakes(name: str, param_name: str, second_name: str | None) -> None:
    """Fakes of fused likelihood `name`'s op and its backward (one parameter: op(params, x); two:
    op(params, x, second, second_value), the second a tensor shaped like params or None)."""

    def fake(params, x, *second):
        _check_likelihood(params, x, param_name)
        return params.new_empty(params.shape[:-1], dtype=_sum_dtype(params.dtype))

    def backward_fake(grad, params, x, *rest):
        *second, needs_grad_x = rest
        grad_x = torch.empty_like(x) if needs_grad_x else x.new_empty((0,))
        if second_name is None:
            return torch.empty_like(params), grad_x
        grad_second = torch.empty_like(second[0]) if second[0] is not None else params.new_empty((0,))
        return torch.empty_like(params), grad_second, grad_x

    torch.library.register_fake(f"fastvae::{name}_log_prob")(fake)
    torch.library.register_fake(f"fastvae::{name}_log_prob_backward")(backward_fake)


# The fakes of the ops with their own signatures (fastvae.ops registers the likelihood ops' fakes
# with register_likelihood_fakes, one line per likelihood).
if backend() == "cpp":
    @torch.library.register_fake("fastvae::latent_terms")
    def _latent_terms_fake(mu, logvar, eps, num_samples, seed, offset, row_offset=0, stl=False):
        _check_latent(mu, logvar, eps, num_samples)
        z_shape = _z_shape(mu, num_samples)
        sums = _sum_dtype(mu.dtype)
        return (
            mu.new_empty(z_shape),
            mu.new_empty((mu.shape[0],), dtype=sums),
            mu.new_empty(z_shape[:-1], dtype=sums),
            mu.new_empty(z_shape[:-1], dtype=sums),
        )

    @torch.library.register_fake("fastvae::latent_terms_from_generator")
    def _latent_terms_from_generator_fake(mu, logvar, num_samples, generator, row_offset=0, stl=False):
        return _latent_terms_fake(mu, logvar, None, num_samples, 0, 0, row_offset, stl)

    @torch.library.register_fake("fastvae::latent_terms_backward")
    def _latent_terms_backward_fake(grad_z, grad_kl, grad_log_q, grad_log_p, z, mu, logvar, stl):
        _check_latent(mu, logvar, None, None)
        return torch.empty_like(mu), torch.empty_like(logvar)

    @torch.library.register_fake("fastvae::fused_head_log_prob")
    def _fused_head_log_prob_fake(h, weight, bias, x, likelihood, logvar_value=0.0, precompute_grads=False,
                                  second_shift=0.0, second_min=None):
        _check_head(h, weight, bias, x, likelihood, logvar_value, second_shift, second_min)
        return h.new_empty(h.shape[:-1], dtype=_sum_dtype(h.dtype))

    @torch.library.register_fake("fastvae::fused_head_log_prob_with_grads")
    def _fused_head_log_prob_with_grads_fake(h, weight, bias, x, likelihood, logvar_value, second_shift=0.0,
                                             second_min=None):
        _check_head(h, weight, bias, x, likelihood, logvar_value, second_shift, second_min)
        grad_bias = torch.empty_like(bias) if bias is not None else h.new_empty((0,))
        log_prob = h.new_empty(h.shape[:-1], dtype=_sum_dtype(h.dtype))
        return log_prob, torch.empty_like(h), torch.empty_like(weight), grad_bias

    @torch.library.register_fake("fastvae::fused_head_log_prob_backward")
    def _fused_head_log_prob_backward_fake(grad, h, weight, bias, x, likelihood, logvar_value, needs_grad_h,
                                           needs_grad_weight, needs_grad_bias, second_shift=0.0, second_min=None):
        _check_head(h, weight, bias, x, likelihood, logvar_value, second_shift, second_min)

        def grad_like(t, needed):
            return torch.empty_like(t) if needed and t is not None else h.new_empty((0,))

        return grad_like(h, needs_grad_h), grad_like(weight, needs_grad_weight), grad_like(bias, needs_grad_bias)

    @torch.library.register_fake("fastvae::gather_bernoulli")
    def _gather_bernoulli_fake(probs, index, seed):
        _check_gather_bernoulli(probs, index)
        return probs.new_empty((index.shape[0], *probs.shape[1:]))

    @torch.library.register_fake("fastvae::sparse_input_linear")
    def _sparse_input_linear_fake(x, weight, bias):
        _check_sparse_input_linear(x, weight, bias)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("fastvae::sparse_input_linear_backward")
    def _sparse_input_linear_backward_fake(grad, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias):
        _check_sparse_input_linear(x, weight, None)
        none = x.new_empty((0,))
        return (torch.empty_like(x) if needs_grad_x else none, torch.empty_like(weight) if needs_grad_weight else none,
                x.new_empty((weight.shape[0],)) if needs_grad_bias else none)
