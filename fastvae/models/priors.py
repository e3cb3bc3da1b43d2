"""Priors p(z) over the latent space: declared and pluggable, like likelihoods and objectives.

A Prior declaration names a prior and says how to build it; the module it builds (a
LatentPrior) is a child of the VAE, so its parameters train, checkpoint and export with the
model. Built-ins:
    standard  N(0, I): the analytic KL and log p(z) come from the fused latent op, as always
    mog       a learned mixture of K diagonal Gaussians (means, log-variances, mixture logits)
    vamp      the VampPrior (Tomczak & Welling 2018): the mixture of the encoder's posteriors
              q(z | u_k) at K learned pseudo-inputs u_k, equally weighted
A prior gives the VAE, for the samples z of q(z|x), the terms the objectives take
(fastvae/models/objectives.py): log p(z) per sample, and the KL per example, analytic where
the prior has one (LatentPrior.analytic_kl) and otherwise the Monte Carlo estimate
mean_l (log q(z_l|x) - log p(z_l)). The densities are the fused ops fastvae.ops.gaussian_kl,
gaussian_log_prob and mixture_log_prob.

Third-party packages add priors with register_prior, or through an entry point in the
"fastvae.priors" group (see fastvae/models/plugins.py), whose value names a Prior declaration,
a module that registers on import, or a callable that registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..ops import LatentTerms
from ..ops import gaussian_kl, gaussian_log_prob, mixture_log_prob
from .plugins import PluginTable, format_rows

ENTRY_POINT_GROUP = "fastvae.priors"
STANDARD = "standard"


class LatentPrior(nn.Module):
    """p(z) as the VAE uses it. Subclasses implement log_prob and sample; those with a closed-form
    KL from a diagonal Gaussian posterior set analytic_kl = True and implement kl.

    encoder: the VAE's encoder, for priors defined through it (the VampPrior); others ignore it.
    Tensors are (..., D) latents; log_prob sums over D.
    """

    analytic_kl = False

    def log_prob(self, z: Tensor, encoder: nn.Module) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement log_prob(z, encoder)")

    def sample(self, num: int, encoder: nn.Module, generator: torch.Generator | None, dtype: torch.dtype,
               device) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sample(num, encoder, generator, ...)")

    def kl(self, mu: Tensor, logvar: Tensor, encoder: nn.Module) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no analytic KL (analytic_kl is False)")

    def terms(self, mu: Tensor, logvar: Tensor, latent: LatentTerms, encoder: nn.Module) -> tuple[Tensor, Tensor]:
        """(kl (B,), log p(z) shaped like latent.log_q) for the samples latent.z of q(z|x) = N(mu, e^logvar).

        latent: the fused latent op's terms (fastvae.ops.latent_terms), whose kl and log_p are under N(0, I).
        """
        log_p = self.log_prob(latent.z, encoder)
        if self.analytic_kl:
            return self.kl(mu, logvar, encoder), log_p
        return (latent.log_q - log_p).reshape(-1, mu.shape[0]).mean(0), log_p


class StandardNormalPrior(LatentPrior):
    """N(0, I): no parameters, so a model with it has the state dict it always had."""

    analytic_kl = True

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def terms(self, mu, logvar, latent, encoder):
        # The fused latent op scored its samples under N(0, I) already: its numbers, unchanged.
        return latent.kl, latent.log_p

    def _zeros(self, like: Tensor) -> Tensor:
        return like.new_zeros(like.shape[-1])

    def log_prob(self, z, encoder=None):
        return gaussian_log_prob(z, self._zeros(z), self._zeros(z))

    def kl(self, mu, logvar, encoder=None):
        return gaussian_kl(mu, logvar)

    def sample(self, num, encoder, generator, dtype, device):
        return torch.randn(num, self.latent_dim, generator=generator, dtype=dtype, device=device)


class MixturePrior(LatentPrior):
    """A mixture of K diagonal Gaussians; subclasses say what the components are (mixture)."""

    def mixture(self, encoder: nn.Module) -> tuple[Tensor, Tensor, Tensor | None]:
        """(means (K, D), logvars (K, D), mixture logits (K,) or None for equal weights)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mixture(encoder)")

    def log_prob(self, z, encoder):
        return mixture_log_prob(z, *self.mixture(encoder))

    def sample(self, num, encoder, generator, dtype, device):
        means, logvars, logits = self.mixture(encoder)
        weights = torch.ones(means.shape[0], device=means.device) if logits is None else torch.softmax(logits, 0)
        component = torch.multinomial(weights, num, replacement=True, generator=generator)
        eps = torch.randn(num, means.shape[1], generator=generator, dtype=means.dtype, device=means.device)
        return (means[component] + torch.exp(0.5 * logvars[component]) * eps).to(dtype=dtype, device=device)


class GaussianMixturePrior(MixturePrior):
    """A learned mixture of K diagonal Gaussians: means, log-variances and mixture logits are parameters."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        # Means drawn from N(0, I) set the components apart from the start (equal means would get
        # equal gradients and stay one component); unit variances and equal weights.
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def mixture(self, encoder):
        return self.means, self.logvars, self.logits


class VampPrior(MixturePrior):
    """The VampPrior: p(z) = 1/K sum_k q(z | u_k) for K learned pseudo-inputs u_k through the encoder."""

    def __init__(self, input_shape: tuple[int, ...], components: int):
        super().__init__()
        # Uniform in [0, 1], the range of image data: distinct pseudo-inputs, so distinct components.
        self.pseudo_inputs = nn.Parameter(torch.rand(components, *input_shape))

    def mixture(self, encoder):
        means, logvars = encoder(self.pseudo_inputs, None)
        return means, logvars, None


class MonteCarloKLWarning(UserWarning):
    """The "analytic" objective met a prior without an analytic KL and used the Monte Carlo estimate."""


def monte_carlo_kl_note(prior: str) -> str:
    """What happens when the "analytic" objective (SGVB-B) is asked for with a prior that has no closed-form KL.

    The choice, made once here: train anyway with the Monte Carlo KL, mean_l (log q - log p), and say so.
    The bound is then the "monte_carlo" one (SGVB-A), exactly: refusing would make the default objective
    fail for every mixture prior, and a silent switch would report an estimate as an analytic KL.
    """
    return (f"prior {prior!r} has no analytic KL: objective 'analytic' uses the Monte Carlo estimate "
            "mean_l (log q(z|x) - log p(z)), which makes it the 'monte_carlo' bound (SGVB-A); choose "
            "--objective monte_carlo or iwae (objective= in Python) to say so and silence this")


# ----------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Prior:
    """name: what --prior calls it; build(latent_dim=, input_shape=, condition_dim=, components=) -> a
    LatentPrior. default_components: K when --prior-components is not given; None for priors that
    have no components (build then gets components=None, and --prior-components is refused)."""

    name: str
    description: str
    build: Callable[..., LatentPrior]
    default_components: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a prior name must be a non-empty string, got {self.name!r}")
        if self.default_components is not None and not _is_count(self.default_components):
            raise ValueError(f"prior {self.name!r}: default_components must be an int >= 1 or None, "
                             f"got {self.default_components!r}")


PRIORS: PluginTable[Prior] = PluginTable(
    "prior", ENTRY_POINT_GROUP, Prior, code_of=lambda item: item.build, builtin_module="fastvae.models.priors")


def register_prior(prior: Prior, *, override: bool = False) -> Prior:
    """Make `prior` available by name to VAE(prior=...) and --prior."""
    return PRIORS.register(prior, override=override)


def get(name: str) -> Prior:
    return PRIORS.get(name)


def names() -> tuple[str, ...]:
    return PRIORS.names()


def reload_plugins() -> None:
    PRIORS.reload()


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def components_of(name: str, components: int | None) -> int | None:
    """The number of components a prior is built with: `components`, or its declared default.

    Raises ValueError for a count below 1, or for a count given to a prior without components.
    """
    spec = get(name)
    if components is None:
        return spec.default_components
    if spec.default_components is None:
        with_components = [p.name for p in (entry.item for entry in PRIORS.entries()) if p.default_components]
        raise ValueError(f"prior_components (--prior-components) is for priors with components "
                         f"({', '.join(with_components)}); prior {name!r} has none")
    if not _is_count(components):
        raise ValueError(f"prior_components (--prior-components) must be an int >= 1, got {components!r}")
    return components


def build_prior(name: str, *, latent_dim: int, input_shape: tuple[int, ...], condition_dim: int = 0,
                components: int | None = None) -> LatentPrior:
    """The module of the prior registered as name, checked to be a LatentPrior."""
    count = components_of(name, components)
    module = get(name).build(latent_dim=latent_dim, input_shape=tuple(input_shape), condition_dim=condition_dim,
                             components=count)
    if not isinstance(module, LatentPrior):
        raise TypeError(f"prior {name!r}: build must return a fastvae.models.priors.LatentPrior, got {module!r}")
    return module


def format_table() -> str:
    """The prior part of `fastvae list`."""
    rows = [("PRIOR", "COMPONENTS", "SOURCE", "DESCRIPTION")]
    for entry in PRIORS.entries():
        item = entry.item
        count = "-" if item.default_components is None else f"K={item.default_components}"
        rows.append((item.name, count, entry.source, item.description))
    return format_rows(rows)


# ----------------------------------------------------------------------------- built-ins
def _build_standard(*, latent_dim, input_shape, condition_dim, components):
    return StandardNormalPrior(latent_dim)


def _build_mog(*, latent_dim, input_shape, condition_dim, components):
    return GaussianMixturePrior(latent_dim, components)


def _build_vamp(*, latent_dim, input_shape, condition_dim, components):
    if condition_dim:
        raise ValueError(f"prior 'vamp' passes pseudo-inputs through the encoder, but this model's encoder also "
                         f"needs a condition (condition_dim={condition_dim}), which pseudo-inputs do not have; "
                         "use prior 'mog' or 'standard' with a conditional model")
    return VampPrior(input_shape, components)


STANDARD_PRIOR = register_prior(Prior(
    STANDARD, "N(0, I), the default: analytic KL", _build_standard))
MOG = register_prior(Prior(
    "mog", "learned mixture of K diagonal Gaussians (means, log-variances, weights); Monte Carlo KL",
    _build_mog, default_components=10))
VAMP = register_prior(Prior(
    "vamp", "VampPrior (Tomczak & Welling 2018): mixture of q(z|u_k) at K learned pseudo-inputs; Monte Carlo KL",
    _build_vamp, default_components=50))
