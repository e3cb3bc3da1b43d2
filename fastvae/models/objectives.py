"""Training objectives: the lower bounds on log p(x) that the VAE maximizes, one table.

Each bound maps the per-sample terms of the fused latent and likelihood ops, in nats,
    rec[l, b] = log p(x_b | z_lb), kl[b] = KL(q(z|x_b) || p(z)), log_q[l, b], log_p[l, b]
(L samples of B examples) and the KL weight beta to the bound per example, (B,). An objective
that needs more (beta-TCVAE: the batch's posteriors) declares settings and gets a LatentBatch too.
kl is analytic where the prior has a closed form (N(0, I)); for the others (mixtures) it is the
Monte Carlo estimate mean_l (log_q - log_p), which makes "analytic" the "monte_carlo" bound (the
VAE warns: fastvae/models/priors.py, monte_carlo_kl_note).
Third-party packages add objectives with register_objective, or through an entry point in
the "fastvae.objectives" group (see fastvae/models/plugins.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..ops import mixture_log_prob
from .plugins import PluginTable, format_rows

ENTRY_POINT_GROUP = "fastvae.objectives"


@dataclass(frozen=True)
class LatentBatch:
    """What an objective declaring settings gets besides the per-sample terms: the batch's samples
    and posteriors, and its settings (the declared defaults, updated by the caller's)."""

    z: Tensor       # (L, B, D)
    mu: Tensor      # (B, D)
    logvar: Tensor  # (B, D)
    settings: dict


@dataclass(frozen=True)
class Objective:
    """name: what --objective calls it; bound(rec, kl, log_q, log_p, beta) -> (B,).

    rows_weighted_equally: whether d bound / d rec[l, b] is the same for every row (a mean over
    the samples). The fused decoder head then computes its gradients in the forward pass;
    otherwise (IWAE's importance weights) its backward recomputes them. False is always correct.
    settings: None, or {name: default} of the objective's own settings; then bound takes a sixth
    argument, the LatentBatch, whose settings are these defaults updated by the caller's
    (VAE.forward(objective_settings=...)).
    """

    name: str
    description: str
    bound: Callable[..., Tensor]
    rows_weighted_equally: bool = False
    settings: dict | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"an objective name must be a non-empty string, got {self.name!r}")

    def settings_with(self, given: dict | None) -> dict:
        """The declared settings updated by `given`; names the objective does not declare raise."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.settings or {}))
        if unknown:
            declared = ", ".join(self.settings or {}) or "none"
            raise ValueError(f"objective {self.name!r} has no setting {', '.join(map(repr, unknown))} "
                             f"(its settings: {declared})")
        return {**(self.settings or {}), **given}

    def evaluate(self, rec: Tensor, kl: Tensor, log_q: Tensor, log_p: Tensor, beta: float,
                 latents: LatentBatch | None = None) -> Tensor:
        """The bound per example (B,); latents are required for an objective with settings."""
        if self.settings is None:
            return self.bound(rec, kl, log_q, log_p, beta)
        if latents is None:
            raise ValueError(f"objective {self.name!r} needs the batch's latents (a LatentBatch), not only the "
                             "per-sample terms")
        return self.bound(rec, kl, log_q, log_p, beta, latents)


OBJECTIVES: PluginTable[Objective] = PluginTable(
    "objective", ENTRY_POINT_GROUP, Objective, code_of=lambda item: item.bound, builtin_module="fastvae.models.objectives")


def register_objective(objective: Objective, *, override: bool = False) -> Objective:
    """Make `objective` available by name to VAE.forward and --objective."""
    return OBJECTIVES.register(objective, override=override)


def get(name: str) -> Objective:
    return OBJECTIVES.get(name)


def names() -> tuple[str, ...]:
    return OBJECTIVES.names()


def reload_plugins() -> None:
    OBJECTIVES.reload()


def format_table() -> str:
    """The objective part of `fastvae list`."""
    rows = [("OBJECTIVE", "SOURCE", "DESCRIPTION")]
    rows += [(entry.item.name, entry.source, entry.item.description) for entry in OBJECTIVES.entries()]
    return format_rows(rows)


# ----------------------------------------------------------------------------- built-ins
def _analytic(rec, kl, log_q, log_p, beta):
    return rec.mean(0) - beta * kl


def _monte_carlo(rec, kl, log_q, log_p, beta):
    return (rec + beta * (log_p - log_q)).mean(0)


def _iwae(rec, kl, log_q, log_p, beta):
    log_w = rec + beta * (log_p - log_q)
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


ANALYTIC = register_objective(Objective(
    "analytic", "SGVB-B, the default: mean_l rec - beta * analytic KL", _analytic, rows_weighted_equally=True))
MONTE_CARLO = register_objective(Objective(
    "monte_carlo", "SGVB-A: mean_l (rec + beta * (log p(z) - log q(z|x)))", _monte_carlo,
    rows_weighted_equally=True))
IWAE = register_objective(Objective(
    "iwae", "the importance-weighted bound of Burda et al. 2016 over the L samples", _iwae))


def aggregate_log_densities(z: Tensor, mu: Tensor, logvar: Tensor, dataset_size: int) -> tuple[Tensor, Tensor]:
    """Minibatch-weighted sampling (Chen et al. 2018) of the aggregate posterior q(z) = 1/N sum_n q(z|x_n)
    at the samples z (..., D) from the batch's M posteriors N(mu_j, e^logvar_j), each (M, D):
        log q(z)   ~= logsumexp_j log q(z | x_j)     - log(N M)
        log q(z_d) ~= logsumexp_j log q(z_d | x_j)   - log(N M)   for every dimension d
    i.e. mixtures over the batch with its posteriors as the components. Returns (log q(z) (...),
    sum_d log q(z_d) (...))."""
    shift = math.log(dataset_size)  # mixture_log_prob weighs the M components 1/M: the other log N
    joint = mixture_log_prob(z, mu, logvar) - shift
    marginals = sum(mixture_log_prob(z[..., d:d + 1], mu[:, d:d + 1], logvar[:, d:d + 1]) - shift
                    for d in range(z.shape[-1]))
    return joint, marginals


def _beta_tcvae(rec, kl, log_q, log_p, beta, latents: LatentBatch):
    # log q(z|x) - log p(z) = [log q(z|x) - log q(z)] + [log q(z) - sum_d log q(z_d)] + [sum_d log q(z_d) - log p(z)]:
    # index-code mutual information, total correlation, dimension-wise KL (for a factorized prior
    # the sum of per-dimension KLs), weighted alpha, beta, gamma.
    settings = latents.settings
    dataset_size = settings["dataset_size"] or latents.mu.shape[0]
    log_qz, log_qz_dims = aggregate_log_densities(latents.z, latents.mu, latents.logvar, dataset_size)
    mutual_information = log_q - log_qz
    total_correlation = log_qz - log_qz_dims
    dimension_wise_kl = log_qz_dims - log_p
    penalty = settings["alpha"] * mutual_information + beta * total_correlation + settings["gamma"] * dimension_wise_kl
    return (rec - penalty).mean(0)


BETA_TCVAE = register_objective(Objective(
    "beta_tcvae", "beta-TCVAE (Chen et al. 2018): mean_l rec - alpha MI - beta TC - gamma dimension-wise KL, "
                  "by minibatch-weighted sampling", _beta_tcvae, rows_weighted_equally=True,
    settings={"alpha": 1.0, "gamma": 1.0, "dataset_size": None}))
