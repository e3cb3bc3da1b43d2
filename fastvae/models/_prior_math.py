"""The Gaussian densities the priors are made of, in plain PyTorch.

Three functions, and the priors (fastvae/models/priors.py) compute only through them:
    gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None)  KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar))
    gaussian_log_prob(z, mu, logvar)                          log N(z; mu, e^logvar)
    mixture_log_prob(z, means, logvars, log_weights=None)     log sum_k w_k N(z; means_k, e^logvars_k)
each summed over the last (latent) dimension, in nats. They have the signatures and semantics of
the fused ops of the same names, so swapping these bodies for those ops changes no caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)
# Rows of z scored at once when no gradient is taken (evaluation): the (rows, K, D) intermediate of
# the broadcast stays below this many elements, whatever the number of importance samples.
_NO_GRAD_ELEMENTS = 1 << 22


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
                prior_logvar: Tensor | None = None) -> Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) summed over the last dimension.

    The prior arguments broadcast against mu; None is the standard normal (mean 0, log-variance 0).
    """
    prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    prior_logvar = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    per_dim = prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) * torch.exp(-prior_logvar) - 1
    return 0.5 * per_dim.sum(-1)


def gaussian_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag e^logvar) summed over the last dimension; leading sample dimensions broadcast
    (z (L, B, D) against mu, logvar (B, D))."""
    return -0.5 * (((z - mu) ** 2) * torch.exp(-logvar) + logvar + _LOG_2PI).sum(-1)


def _check_mixture(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor | None) -> None:
    if means.dim() != 2 or means.shape[0] < 1:
        raise ValueError(f"means must have shape (K, D) with K >= 1 components, got {tuple(means.shape)}")
    if logvars.shape != means.shape:
        raise ValueError(f"logvars must have the shape of means {tuple(means.shape)}, got {tuple(logvars.shape)}")
    if z.dim() < 1 or z.shape[-1] != means.shape[1]:
        raise ValueError(f"z must have shape (..., {means.shape[1]}) to match the components, got {tuple(z.shape)}")
    if log_weights is not None and tuple(log_weights.shape) != (means.shape[0],):
        raise ValueError(f"log_weights must have shape ({means.shape[0]},), one per component, "
                         f"got {tuple(log_weights.shape)}")


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """log sum_k w_k N(z; means_k, diag e^logvars_k) for z (..., D) and K components (K, D); returns (...).

    w = softmax(log_weights), or 1/K each when log_weights is None. The sum over k is a logsumexp,
    so components far from z underflow to nothing instead of to log 0.
    """
    _check_mixture(z, means, logvars, log_weights)
    log_w = (torch.full((means.shape[0],), -math.log(means.shape[0]), dtype=means.dtype, device=means.device)
             if log_weights is None else torch.log_softmax(log_weights, dim=0))
    lead = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1])
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (z, means, logvars, log_w))
    rows = flat.shape[0] if tracked else max(1, _NO_GRAD_ELEMENTS // means.numel())
    parts = [torch.logsumexp(log_w + gaussian_log_prob(chunk[:, None, :], means, logvars), dim=-1)
             for chunk in flat.split(rows)] if flat.shape[0] else [flat.new_zeros(0)]
    return torch.cat(parts).reshape(lead)
