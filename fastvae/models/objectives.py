"""Training objectives: the lower bounds on log p(x) that the VAE maximizes, one table.

Each bound maps the per-sample terms of the fused latent and likelihood ops, in nats,
    rec[l, b] = log p(x_b | z_lb), kl[b] = KL(q(z|x_b) || p(z)), log_q[l, b], log_p[l, b]
(L samples of B examples) and the KL weight beta to the bound per example, (B,). kl is analytic
where the prior has a closed form (N(0, I)); for the others (mixtures) it is the Monte Carlo
estimate mean_l (log_q - log_p), which makes "analytic" the "monte_carlo" bound (the VAE warns:
fastvae/models/priors.py, monte_carlo_kl_note).
Third-party packages add objectives with register_objective, or through an entry point in
the "fastvae.objectives" group (see fastvae/models/plugins.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .plugins import PluginTable, format_rows

ENTRY_POINT_GROUP = "fastvae.objectives"


@dataclass(frozen=True)
class Objective:
    """name: what --objective calls it; bound(rec, kl, log_q, log_p, beta) -> (B,).

    rows_weighted_equally: whether d bound / d rec[l, b] is the same for every row (a mean over
    the samples). The fused decoder head then computes its gradients in the forward pass;
    otherwise (IWAE's importance weights) its backward recomputes them. False is always correct.
    """

    name: str
    description: str
    bound: Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
    rows_weighted_equally: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"an objective name must be a non-empty string, got {self.name!r}")


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
