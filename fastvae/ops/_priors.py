"""Densities for priors beyond N(0, I): the KL to a diagonal Gaussian prior, the diagonal
Gaussian log-density at samples, and the log-density of a diagonal Gaussian mixture.

    gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None) -> (...)
    gaussian_log_prob(z, mu, logvar)                          -> (...)
    mixture_log_prob(z, means, logvars, log_weights=None)     -> (...)

Each runs one fused op of the extension (csrc/priors_ops.cpp; torch.ops.fastvae.gaussian_kl_prior,
gaussian_log_density, mixture_log_prob), or its pure-PyTorch version in fastvae.ops.reference
without it. This module also holds the ops' argument checks (the same messages as
csrc/priors_host.h) and their fakes for torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import _latent_op, backend
from ._checks import _check_same, _require

_KL_NAMES = ("mu", "logvar", "prior_mu", "prior_logvar")
_LOG_DENSITY_NAMES = ("z", "mu", "logvar")


# ---------------------------------------------------------------------------
# Checks (the fakes and the reference backend run them; the kernels run their C++ twins).
# ---------------------------------------------------------------------------
def _check_prior_dtype(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fastvae: {name} must be a torch.Tensor, got {type(t).__name__}")
    _require(t.dtype in (torch.float32, torch.float64),
             f"fastvae: {name} must be a float32 or float64 tensor, got {t.dtype}")


def _broadcast_operands(tensors, names) -> tuple[int, ...]:
    """The broadcast shape of the operands of a row-broadcast op, naming the first that does not fit."""
    _check_prior_dtype(tensors[0], names[0])
    for t, name in zip(tensors[1:], names[1:]):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastvae: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check_same(t, tensors[0], name, names[0])
    full: tuple[int, ...] = ()
    for i, (t, name) in enumerate(zip(tensors, names)):
        shape = tuple(t.shape) or (1,)
        try:
            full = torch.broadcast_shapes(full, shape)
        except RuntimeError:
            raise RuntimeError(
                f"fastvae: {name} of shape {tuple(t.shape)} does not broadcast against the shape {full} of "
                f"{names[0]}{' and the arguments before it' if i > 1 else ''}"
            ) from None
    return tuple(full)


def _check_mixture(z, means, logvars, log_weights) -> None:
    _check_prior_dtype(z, "z")
    for t, name in ((means, "means"), (logvars, "logvars")) + (() if log_weights is None else
                                                               ((log_weights, "log_weights"),)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fastvae: {name} must be a torch.Tensor, got {type(t).__name__}")
        _check_same(t, z, name, "z")
    _require(z.dim() >= 1, "fastvae: z must have shape (..., latent_dim), got a scalar")
    _require(means.dim() == 2 and means.shape[1] == z.shape[-1],
             f"fastvae: means must have shape (num_components, {z.shape[-1]}) to match z's last dimension, "
             f"got {tuple(means.shape)}")
    _require(means.shape[0] >= 1,
             f"fastvae: means must hold at least one component (num_components >= 1), got shape "
             f"{tuple(means.shape)}")
    _require(logvars.shape == means.shape,
             f"fastvae: logvars must have the shape of means {tuple(means.shape)}, got {tuple(logvars.shape)}")
    if log_weights is not None:
        _require(log_weights.dim() == 1 and log_weights.shape[0] == means.shape[0],
                 f"fastvae: log_weights must have shape (num_components,) = ({means.shape[0]},), got "
                 f"{tuple(log_weights.shape)}")


def _as_operand(value, ref: Tensor, name: str) -> Tensor:
    """A tensor operand, or one number for every element (as a 0-dim tensor like ref)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastvae: {name} must be a tensor or a number, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=ref.dtype, device=ref.device)


# ---------------------------------------------------------------------------
# Op handles and fakes.
# ---------------------------------------------------------------------------
def _empty_grad(t: Tensor, needed: bool) -> Tensor:
    # Contiguous, like the kernels' gradients, whatever t's strides.
    return torch.empty(t.shape, dtype=t.dtype, device=t.device) if needed else t.new_empty((0,))


if backend() == "cpp":
    _kl_prior_op = torch.ops.fastvae.gaussian_kl_prior.default
    _log_density_op = torch.ops.fastvae.gaussian_log_density.default
    _mixture_op = torch.ops.fastvae.mixture_log_prob.default

    @torch.library.register_fake("fastvae::gaussian_kl_prior")
    def _gaussian_kl_prior_fake(mu, logvar, prior_mu, prior_logvar):
        full = _broadcast_operands((mu, logvar, prior_mu, prior_logvar), _KL_NAMES)
        return mu.new_empty(full[:-1])

    @torch.library.register_fake("fastvae::gaussian_kl_prior_backward")
    def _gaussian_kl_prior_backward_fake(grad, mu, logvar, prior_mu, prior_logvar, needs_grad):
        operands = (mu, logvar, prior_mu, prior_logvar)
        _broadcast_operands(operands, _KL_NAMES)
        return tuple(_empty_grad(t, needed) for t, needed in zip(operands, needs_grad))

    @torch.library.register_fake("fastvae::gaussian_log_density")
    def _gaussian_log_density_fake(z, mu, logvar):
        return z.new_empty(_broadcast_operands((z, mu, logvar), _LOG_DENSITY_NAMES)[:-1])

    @torch.library.register_fake("fastvae::gaussian_log_density_backward")
    def _gaussian_log_density_backward_fake(grad, z, mu, logvar, needs_grad):
        _broadcast_operands((z, mu, logvar), _LOG_DENSITY_NAMES)
        return tuple(_empty_grad(t, needed) for t, needed in zip((z, mu, logvar), needs_grad))

    @torch.library.register_fake("fastvae::mixture_log_prob")
    def _mixture_log_prob_fake(z, means, logvars, log_weights):
        _check_mixture(z, means, logvars, log_weights)
        return z.new_empty(z.shape[:-1])

    @torch.library.register_fake("fastvae::mixture_log_prob_forward")
    def _mixture_log_prob_forward_fake(z, means, logvars, log_weights):
        _check_mixture(z, means, logvars, log_weights)
        return z.new_empty(z.shape[:-1]), z.new_empty((*z.shape[:-1], means.shape[0]))

    @torch.library.register_fake("fastvae::mixture_log_prob_backward")
    def _mixture_log_prob_backward_fake(grad, z, means, logvars, log_weights, responsibilities):
        _check_mixture(z, means, logvars, log_weights)
        grad_log_weights = z.new_empty((0,)) if log_weights is None else _empty_grad(log_weights, True)
        return _empty_grad(z, True), _empty_grad(means, True), _empty_grad(logvars, True), grad_log_weights

else:

    def _kl_prior_op(mu, logvar, prior_mu, prior_logvar):
        _broadcast_operands((mu, logvar, prior_mu, prior_logvar), _KL_NAMES)
        return reference.gaussian_kl_prior(mu, logvar, prior_mu, prior_logvar)

    def _log_density_op(z, mu, logvar):
        _broadcast_operands((z, mu, logvar), _LOG_DENSITY_NAMES)
        return reference.gaussian_log_density(z, mu, logvar)

    def _mixture_op(z, means, logvars, log_weights):
        _check_mixture(z, means, logvars, log_weights)
        return reference.mixture_log_prob(z, means, logvars, log_weights)


# ---------------------------------------------------------------------------
# The public functions.
# ---------------------------------------------------------------------------
def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | float | None = None,
                prior_logvar: Tensor | float | None = None) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over the last dimension.

    Without a prior (both None) the prior is N(0, I): mu and logvar are (B, D), the result
    (B,), computed by the latent op (when you also need z, call latent_terms once instead,
    which gives both from the same pass). With a prior, the four arguments broadcast against
    each other (a conditional prior (B, D), a learned one (D,), one number; a prior argument
    left None is 0) and the result has the broadcast shape without its last dimension;
    gradients flow to every tensor argument. Exact where logvar is close to prior_logvar:
    e^r - 1 - r (r = logvar - prior_logvar) comes from its series for |r| < 1/2.
    """
    if prior_mu is None and prior_logvar is None:
        return _latent_op(mu, logvar, None, None, 0, 0, 0, False)[1]
    _check_prior_dtype(mu, "mu")
    prior_mu = _as_operand(0.0 if prior_mu is None else prior_mu, mu, "prior_mu")
    prior_logvar = _as_operand(0.0 if prior_logvar is None else prior_logvar, mu, "prior_logvar")
    return _kl_prior_op(mu, _as_operand(logvar, mu, "logvar"), prior_mu, prior_logvar)


def gaussian_log_prob(z: Tensor, mu: Tensor | float, logvar: Tensor | float) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension.

    The arguments broadcast against each other: samples z (L, B, D) against a posterior or
    conditional prior mu, logvar (B, D), or against a learned prior (D,), without copying mu
    and logvar L times, forward or backward. Returns the broadcast shape without its last
    dimension; gradients flow to every tensor argument.
    """
    _check_prior_dtype(z, "z")
    return _log_density_op(z, _as_operand(mu, z, "mu"), _as_operand(logvar, z, "logvar"))


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """log sum_k w_k N(z; means_k, exp(logvars_k)) for z (..., D) and K diagonal components: (...).

    means, logvars: (K, D); w = softmax(log_weights) (log_weights (K,)), or 1/K when None.
    The (..., K, D) differences are never formed or saved: the quadratic forms come from
    matmuls, the pairs where those would cancel (z close to a component of tiny variance)
    are recomputed exactly, and backward needs only the (..., K) responsibilities. Exact in
    float64 for log-variances from -30 to 20. Gradients flow to z, means, logvars and
    log_weights.
    """
    return _mixture_op(z, means, logvars, log_weights)
