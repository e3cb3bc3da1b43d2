"""Evaluation: the test-set ELBO and the importance-sampled log-likelihood papers report.

log p(x) ~= logsumexp_k (log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log K,  z_k ~ q(z|x)
(Burda et al. 2016, with K = 5000 for paper comparisons), log p(z) under the model's prior; with
several stochastic layers z is the whole chain z1 .. zN (fastvae/models/hierarchy.py). Samples are
processed in chunks and combined with a running logsumexp, so memory stays bounded whatever K is,
and whole minibatches go through the fused ops at once (not one test point at a time).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models import likelihoods
from .. import ops
from ..io.data import one_hot
from ..models.vae import VAE, bound


def _conditions(labels, num_classes, index, device):
    if labels is None or not num_classes:
        return None
    return one_hot(labels[index], num_classes).to(device)


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: VAE,
    x: Tensor,
    condition: Tensor | None = None,
    num_samples: int = 5000,
    max_elements: int = 2**24,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate of log p(x) per example, (B,), from `num_samples` importance samples.

    max_elements bounds the decoder output held at once (samples x batch x pixels).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    log_weights = _one_layer_log_weights(model, x, condition, generator) if model.stochastic_layers == 1 else (
        lambda count: model.importance_log_weights(x, condition, count, generator))  # the whole chain
    pixels = math.prod(model.input_shape)
    chunk = max(1, min(num_samples, max_elements // max(1, x.shape[0] * pixels)))
    running = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < num_samples:
        count = min(chunk, num_samples - done)
        log_w = log_weights(count).double()
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        done += count
    return running - math.log(num_samples)


def _one_layer_log_weights(model: VAE, x: Tensor, condition: Tensor | None, generator):
    """count -> log p(x|z) + log p(z) - log q(z|x) of count draws, (count, B); x is encoded once."""
    mu, logvar = model.encode(x, condition)

    def log_weights(count: int) -> Tensor:
        latent = ops.latent_terms(mu, logvar, count, generator=generator)
        rec = model.log_likelihood(model.decode(latent.z, condition), x)
        _, log_p = model.prior_terms(mu, logvar, latent)
        return rec + log_p - latent.log_q

    return log_weights


@torch.no_grad()
def evaluate(
    model: VAE,
    images: Tensor,
    labels: Tensor | None = None,
    num_classes: int = 0,
    *,
    batch_size: int = 500,
    is_samples: int = 0,
    num_samples: int = 1,
    binarize=None,
    generator: torch.Generator | None = None,
    progress=None,
) -> dict:
    """Mean per-example ELBO (analytic KL; the Monte Carlo KL of num_samples samples for priors without an
    analytic one), its two terms, and (is_samples > 0) the IS log-likelihood;
    for likelihoods of 8-bit images also both in bits per dimension (elbo_bpd, log_likelihood_bpd).

    binarize: a function applied to each batch (e.g. fixed-threshold or stochastic
    binarization) so evaluation sees data as training did.
    """
    model.eval()
    device = next(model.parameters()).device
    totals = {"elbo": 0.0, "rec": 0.0, "kl": 0.0, "log_likelihood": 0.0}
    count = 0
    # The same bound either way (kl is the Monte Carlo one without an analytic KL); this one is not warned.
    objective = "analytic" if model.prior.analytic_kl else "monte_carlo"
    starts = range(0, images.shape[0], batch_size)
    for start in progress(starts) if progress else starts:
        index = torch.arange(start, min(start + batch_size, images.shape[0]))
        x = images[index].to(device)
        x = binarize(x) if binarize else x
        condition = _conditions(labels, num_classes if model.condition_dim else 0, index, device)
        out = model(x, condition, num_samples=num_samples, generator=generator, objective=objective)
        totals["elbo"] += bound("analytic", out.rec, out.kl, out.log_q, out.log_p).sum().item()
        totals["rec"] += out.rec.mean(0).sum().item()
        totals["kl"] += out.kl.sum().item()
        if is_samples:
            totals["log_likelihood"] += importance_sampled_log_likelihood(
                model, x, condition, is_samples, generator=generator
            ).sum().item()
        count += x.shape[0]
    results = {key: value / max(count, 1) for key, value in totals.items()}
    if not is_samples:
        results.pop("log_likelihood")
    if model.likelihood_spec.bits_per_dim:  # 8-bit image likelihoods: also in bits per dimension
        for key in ("elbo", "log_likelihood"):
            if key in results:
                results[f"{key}_bpd"] = likelihoods.bits_per_dim(-results[key], model.input_shape)
    results["examples"] = count
    return results
