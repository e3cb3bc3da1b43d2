"""The implementations every op benchmark compares, computing the same outputs.

- fastvae:       the fused C++ op (fastvae.latent_terms / *_log_likelihood)
- eager:         the same math in eager PyTorch, written as the canonical PyTorch VAE
                 example writes it (std = exp(0.5*logvar), eps = randn_like(std), ...)
- compile:       that eager function under torch.compile (inductor)
- distributions: torch.distributions (Normal.rsample + kl_divergence + log_prob), what
                 most VAE libraries do

Each latent provider returns (z, kl, log_q, log_p); each likelihood provider the per-row
log-likelihood. Shapes follow fastvae's contract, so results are interchangeable.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastvae

LOG_2PI = math.log(2 * math.pi)


def latent_fastvae(mu, logvar, num_samples=None):
    return tuple(fastvae.latent_terms(mu, logvar, num_samples))


def latent_eager(mu, logvar, num_samples=None):
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std) if num_samples is None else std.new_empty((num_samples, *std.shape)).normal_()
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
    dim = mu.shape[-1]
    log_q = torch.sum(-0.5 * eps.pow(2) - 0.5 * logvar, dim=-1) - 0.5 * LOG_2PI * dim
    log_p = torch.sum(-0.5 * z.pow(2), dim=-1) - 0.5 * LOG_2PI * dim
    return z, kl, log_q, log_p


def latent_distributions(mu, logvar, num_samples=None):
    q = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.rsample() if num_samples is None else q.rsample((num_samples,))
    return z, kl_divergence(q, prior).sum(-1), q.log_prob(z).sum(-1), prior.log_prob(z).sum(-1)


def bernoulli_fastvae(logits, x):
    return fastvae.bernoulli_log_likelihood(logits, x, check_range=False)


def bernoulli_eager(logits, x):
    # The canonical example's F.binary_cross_entropy(..., reduction="sum"), per row and from logits.
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)


def bernoulli_distributions(logits, x):
    return Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)


_compiled: dict = {}


def compiled(fn):
    """torch.compile(fn), built once per function so every size reuses the cache."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


LATENT = {
    "fastvae": latent_fastvae,
    "eager": latent_eager,
    "compile": lambda mu, logvar, num_samples=None: compiled(latent_eager)(mu, logvar, num_samples),
    "distributions": latent_distributions,
}

BERNOULLI = {
    "fastvae": bernoulli_fastvae,
    "eager": bernoulli_eager,
    "compile": lambda logits, x: compiled(bernoulli_eager)(logits, x),
    "distributions": bernoulli_distributions,
}


# ---------------------------------------------------------------------------
# What the benchmark files share: the timed callable per mode, and the traffic each op
# cannot avoid (inputs read once, outputs written once), for GB/s.
# ---------------------------------------------------------------------------
FLOAT_BYTES = 4


def run_mode(fn, inputs, mode, sync=None):
    """The callable pytest-benchmark times: fn(*inputs), or that plus backward of every output.

    Warmed up (and compiled, for torch.compile) beforehand. `sync` (e.g. torch.cuda.synchronize)
    runs after each call so that a sample is the work itself, not a kernel launch.
    """
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(*inputs)
    else:
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = tuple(torch.ones_like(o) for o in outputs)

        def step():
            out = fn(*inputs)
            torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    def timed():
        step()
        if sync is not None:
            sync()

    for _ in range(3):
        timed()
    return timed


def latent_bytes(batch, dim, samples, mode):
    rows = samples or 1
    forward = (2 * batch * dim + rows * batch * dim) * FLOAT_BYTES  # mu, logvar in; z out
    backward = (2 * rows * batch * dim + 4 * batch * dim) * FLOAT_BYTES  # z, grad_z, mu, logvar in; 2 grads out
    return forward + (backward if mode != "forward" else 0)


def bernoulli_bytes(logits_numel, batch, pixels, mode):
    traffic = (logits_numel + batch * pixels) * FLOAT_BYTES  # logits, x in (the row sums are negligible)
    return traffic if mode == "forward" else 2 * traffic + logits_numel * FLOAT_BYTES  # + grad_logits out
