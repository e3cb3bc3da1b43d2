"""The implementations every op benchmark compares, computing the same outputs.

- fastvae:       the fused C++ op (fastvae.latent_terms / *_log_likelihood)
- eager:         the same math in eager PyTorch, written as the canonical PyTorch VAE
                 example writes it (std = exp(0.5*logvar), eps = randn_like(std), ...)
  (these two are fastvae.bench's, so `fastvae bench` times exactly what this suite times)
- compile:       that eager function under torch.compile (inductor)
- distributions: torch.distributions (Normal.rsample + kl_divergence + log_prob), what
                 most VAE libraries do

Each latent provider returns (z, kl, log_q, log_p); each likelihood provider the per-row
log-likelihood. Shapes follow fastvae's contract, so results are interchangeable.
"""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal, kl_divergence

from fastvae.bench import eager_bernoulli as bernoulli_eager
from fastvae.bench import eager_latent as latent_eager
from fastvae.bench import fused_bernoulli as bernoulli_fastvae
from fastvae.bench import fused_latent as latent_fastvae
from fastvae.bench import eager_continuous_bernoulli as continuous_bernoulli_eager
from fastvae.bench import eager_discretized_logistic as discretized_logistic_eager
from fastvae.bench import fused_continuous_bernoulli as continuous_bernoulli_fastvae
from fastvae.bench import fused_discretized_logistic as discretized_logistic_fastvae
from fastvae.bench import NOISE_SIZES, normal_fill, run_mode  # noqa: F401  (the benchmark files take them from here)


def latent_distributions(mu, logvar, num_samples=None):
    q = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.rsample() if num_samples is None else q.rsample((num_samples,))
    return z, kl_divergence(q, prior).sum(-1), q.log_prob(z).sum(-1), prior.log_prob(z).sum(-1)


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
# What the benchmark files share besides fastvae.bench.run_mode: the traffic each op
# cannot avoid (inputs read once, outputs written once), for GB/s.
# ---------------------------------------------------------------------------
FLOAT_BYTES = 4


def latent_bytes(batch, dim, samples, mode):
    rows = samples or 1
    forward = (2 * batch * dim + rows * batch * dim) * FLOAT_BYTES  # mu, logvar in; z out
    backward = (2 * rows * batch * dim + 4 * batch * dim) * FLOAT_BYTES  # z, grad_z, mu, logvar in; 2 grads out
    return forward + (backward if mode != "forward" else 0)


def bernoulli_bytes(logits_numel, batch, pixels, mode):
    traffic = (logits_numel + batch * pixels) * FLOAT_BYTES  # logits, x in (the row sums are negligible)
    return traffic if mode == "forward" else 2 * traffic + logits_numel * FLOAT_BYTES  # + grad_logits out


# Continuous Bernoulli and discretized logistic (benchmarks/test_bench_likelihoods.py).
def continuous_bernoulli_distributions(logits, x):
    return ContinuousBernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)


CONTINUOUS_BERNOULLI = {
    "fastvae": continuous_bernoulli_fastvae,
    "eager": continuous_bernoulli_eager,
    "compile": lambda logits, x: compiled(continuous_bernoulli_eager)(logits, x),
    "distributions": continuous_bernoulli_distributions,
}

DISCRETIZED_LOGISTIC = {
    "fastvae": discretized_logistic_fastvae,
    "eager": discretized_logistic_eager,
    "compile": lambda mean, log_scale, x: compiled(discretized_logistic_eager)(mean, log_scale, x),
}
