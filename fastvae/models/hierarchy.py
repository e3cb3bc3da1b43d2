"""Several stochastic layers (Burda et al. 2016): a VAE whose latent is a chain z1 -> z2 -> ... -> zN.

    inference   q(z1|x) q(z2|z1) ... q(zN|zN-1)
    generation  p(zN) p(zN-1|zN) ... p(z1|z2) p(x|z1)

The first layer is the plain VAE's: the registry encoder gives q(z1|x), the registry decoder
p(x|z1) (the model's likelihood, fused head included). Every layer above it is a pair of
Gaussian layers on flat vectors, each an Encoder of the registry contract built with
input_shape=(D_in,): q(z_i+1|z_i) maps z_i to (mu, logvar) of z_i+1, p(z_i|z_i+1) maps z_i+1 to
(mu, logvar) of z_i. Burda et al.'s two-layer MNIST model is 784-200-200-100 (q(z1|x)),
100-100-100-50 (q(z2|z1)), and the mirror images for p.

Per sample l and example b, in nats, summed over dimensions (what the objectives read):
    rec[l, b]   = log p(x | z1)
    log_q[l, b] = sum_i log q(z_i | z_i-1)                        (z_0 = x)
    log_p[l, b] = log p(zN) + sum_i<N log p(z_i | z_i+1)
    kl[b]       = mean_l ( KL(q(zN|zN-1) || p(zN)) + log_q - log q(zN|.) - (log_p - log p(zN)) )
kl is an unbiased estimate of KL(q(z1..zN|x) || p(z1..zN)): no closed form exists for the chain,
so only the top layer's KL given its input is analytic (when the prior has one) and the layers below
it are Monte Carlo. The "analytic" objective (rec - beta * kl) is therefore "analytic at the top,
Monte Carlo below"; "monte_carlo" and "iwae" use log_q and log_p of the whole chain, and the
importance-sampled log p(x) (fastvae/training/evaluate.py) draws the whole chain for every sample.

The prior p(zN) is the model's prior (fastvae/models/priors.py: standard, mog or a plugin's), built
for zN's size; its terms() give log p(zN) and the KL at the top (analytic where the prior has one),
its sample() draws zN. The VampPrior is refused here: its pseudo-inputs would have to pass through
the whole inference chain to reach zN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import objectives, priors, registry
from .vae import VAE, VAEOutput
from .. import ops
from ..ops import LatentTerms

# Burda et al.'s second layer: 100-100-100-50 for q(z2|z1), 50-100-100-100 for p(z1|z2).
DEFAULT_UPPER_HIDDEN = (100, 100)
DEFAULT_UPPER_LATENT_DIMS = (50,)
MAX_LAYERS = 8  # a guard against typos (--stochastic-layers 20); nothing breaks above it


@dataclass
class HierarchyOutput(VAEOutput):
    """VAEOutput (z, mu, logvar are the first layer's) plus the layers above it, bottom to top:
    upper[i] is the LatentTerms of q(z_i+2 | z_i+1), rows example-major (B * L, D)."""

    upper: tuple[LatentTerms, ...] = ()


def _check_int_list(arg: str, values, low: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{arg} must be a list of ints >= {low}, got {values!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
        raise ValueError(f"{arg} must contain ints >= {low} only, got {list(values)}")
    return values


def check_layers(stochastic_layers, upper_latent_dims) -> tuple[int, tuple[int, ...]]:
    """(stochastic_layers, upper_latent_dims) checked against each other; names what is wrong."""
    if isinstance(stochastic_layers, bool) or not isinstance(stochastic_layers, int) \
            or not 1 <= stochastic_layers <= MAX_LAYERS:
        raise ValueError(f"stochastic_layers must be an int in 1..{MAX_LAYERS}, got {stochastic_layers!r}")
    dims = _check_int_list("upper_latent_dims", upper_latent_dims)
    if len(dims) != stochastic_layers - 1:
        raise ValueError(f"upper_latent_dims needs one latent size per stochastic layer above the first "
                         f"({stochastic_layers - 1} for stochastic_layers={stochastic_layers}), got {list(dims)}")
    return stochastic_layers, dims


class HierarchicalVAE(VAE):
    """A VAE with `stochastic_layers` >= 2 Gaussian layers (see the module docstring).

    The first layer's arguments are VAE's (latent_dim is z1's size; encoder, decoder, likelihood and
    their configs). upper_latent_dims: the sizes of z2 .. zN. layer_architecture: the registered
    encoder that builds every q(z_i+1|z_i) and p(z_i|z_i+1) on flat vectors (registry: "Stochastic
    layers above the first"), configured by layer_config (default: mlp with hidden 100-100, Burda's).
    upper_encoders / upper_decoders: ready modules instead (bottom to top; such a model cannot be
    rebuilt from its config, as with custom encoder modules).
    """

    def __init__(
        self,
        input_shape,
        latent_dim: int = 100,
        encoder="mlp",
        decoder=None,
        likelihood: str = "bernoulli",
        encoder_config: dict | None = None,
        decoder_config: dict | None = None,
        condition_dim: int = 0,
        gaussian_logvar: float = 0.0,
        *,
        stochastic_layers: int = 2,
        upper_latent_dims: Sequence[int] = DEFAULT_UPPER_LATENT_DIMS,
        layer_architecture: str | None = "mlp",
        layer_config: dict | None = None,
        upper_encoders: Sequence[nn.Module] | None = None,
        upper_decoders: Sequence[nn.Module] | None = None,
        prior: str | priors.LatentPrior = priors.STANDARD,
        prior_components: int | None = None,
    ):
        # The first layer's z1 has p(z1|z2) for its prior; the model's prior is built below, for zN.
        super().__init__(input_shape, latent_dim, encoder, decoder, likelihood, encoder_config, decoder_config,
                         condition_dim, gaussian_logvar)
        stochastic_layers, upper_latent_dims = check_layers(stochastic_layers, upper_latent_dims)
        if stochastic_layers < 2:
            raise ValueError("HierarchicalVAE needs stochastic_layers >= 2; one stochastic layer is fastvae.VAE")
        if layer_config is None:  # Burda's widths for mlp; a custom architecture's own defaults otherwise
            layer_config = {"hidden": list(DEFAULT_UPPER_HIDDEN)} if layer_architecture == "mlp" else {}
        layer_config = dict(layer_config)
        self.stochastic_layers = stochastic_layers
        self.latent_dims = (latent_dim, *upper_latent_dims)
        if (upper_encoders is None) != (upper_decoders is None):
            raise ValueError("pass both upper_encoders and upper_decoders, or neither")
        if upper_encoders is None:
            if not isinstance(layer_architecture, str):
                raise ValueError(f"layer_architecture must be a registered encoder name, got {layer_architecture!r}")
            upper_encoders, upper_decoders = self._build_layers(layer_architecture, layer_config)
        else:
            layer_architecture = None
            self._check_modules(upper_encoders, upper_decoders)
        self.upper_encoders = nn.ModuleList(upper_encoders)  # q(z_i+1 | z_i), bottom to top
        self.upper_decoders = nn.ModuleList(upper_decoders)  # p(z_i | z_i+1), bottom to top
        self.prior = self._top_prior(prior, prior_components)
        self.config.update({
            "stochastic_layers": stochastic_layers,
            "upper_latent_dims": list(upper_latent_dims),
            "layer_architecture": layer_architecture,
            "layer_config": layer_config,
        })
        if layer_architecture is None:
            self.config["encoder"] = None  # rebuilt by whoever made the modules, as for custom encoders

    def _top_prior(self, prior, components) -> priors.LatentPrior:
        if not isinstance(prior, str):
            self.config["prior"] = None  # a ready module: rebuilt by whoever made it
            return prior
        if prior == "vamp":
            raise ValueError("prior 'vamp' is not supported with stochastic_layers >= 2: its pseudo-inputs would "
                             "have to pass through the whole inference chain to reach the top layer; use "
                             "'standard' or 'mog'")
        self.config.update({"prior": prior, "prior_components": components})
        return priors.build_prior(prior, latent_dim=self.latent_dims[-1], input_shape=self.input_shape,
                                  condition_dim=self.condition_dim, components=components)

    def _build_layers(self, name: str, config: dict) -> tuple[list[nn.Module], list[nn.Module]]:
        def build(d_in: int, d_out: int, role: str) -> nn.Module:
            try:
                return registry.build_encoder(name, input_shape=(d_in,), latent_dim=d_out,
                                              condition_dim=self.condition_dim, **config)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"layer_architecture {name!r} cannot build {role} ({d_in} -> {d_out}) on flat "
                                f"vectors: {exc}") from None

        pairs = list(zip(self.latent_dims[:-1], self.latent_dims[1:]))
        encoders = [build(lower, upper, f"q(z{i + 2}|z{i + 1})") for i, (lower, upper) in enumerate(pairs)]
        decoders = [build(upper, lower, f"p(z{i + 1}|z{i + 2})") for i, (lower, upper) in enumerate(pairs)]
        return encoders, decoders

    def _check_modules(self, encoders, decoders) -> None:
        if len(encoders) != self.stochastic_layers - 1 or len(decoders) != self.stochastic_layers - 1:
            raise ValueError(f"upper_encoders and upper_decoders need {self.stochastic_layers - 1} modules each "
                             f"(stochastic_layers={self.stochastic_layers}), got {len(encoders)} and {len(decoders)}")
        if not all(isinstance(m, nn.Module) for m in (*encoders, *decoders)):
            raise TypeError("upper_encoders and upper_decoders must be nn.Modules")

    # ------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        condition: Tensor | None = None,
        *,
        num_samples: int = 1,
        objective: str = "analytic",
        beta: float = 1.0,
        stl: bool = False,
        generator: torch.Generator | None = None,
        row_offset: int = 0,
        objective_settings: dict | None = None,
    ) -> HierarchyOutput:
        """Draw the chain z1 .. zN (L samples per example), decode x from z1, and score every layer.

        Same arguments as VAE.forward. The layers above the first run on the B * L rows example-major
        (row b * L + l), so with row_offset every row's noise still depends on its global index only.
        """
        spec = objectives.get(objective)
        if spec.settings is not None:  # beta_tcvae's estimators read one layer's posteriors
            raise ValueError(f"objective {objective!r} is not supported with stochastic_layers >= 2; use analytic, "
                             "monte_carlo or iwae")
        bound_of = spec.bound
        self._check_input(x, condition)
        batch = x.shape[0]
        mu, logvar = self.encode(x, condition)
        first = ops.latent_terms(mu, logvar, num_samples, generator=generator, stl=stl, row_offset=row_offset)
        mean_decoded, rec = self._decode_and_score(first.z, condition, x, objective)
        rows = None if condition is None else condition.repeat_interleave(num_samples, 0)
        z = first.z.transpose(0, 1).reshape(batch * num_samples, self.latent_dim)
        upper, log_q_upper, log_p_below = [], 0, 0
        for encoder, decoder in zip(self.upper_encoders, self.upper_decoders):
            top_mu, top_logvar = encoder(z, rows)
            latent = ops.latent_terms(top_mu, top_logvar, generator=generator, stl=stl,
                                      row_offset=row_offset * num_samples)
            log_p_below = log_p_below + ops.gaussian_log_prob(z, *decoder(latent.z, rows))
            log_q_upper = log_q_upper + latent.log_q
            upper.append(latent)
            z = latent.z
        if objective == "analytic" and not self.prior.analytic_kl:
            self._warn_monte_carlo_kl()
        # Per row of zN: the prior's KL (analytic, or the row's Monte Carlo estimate) and log p(zN).
        kl_top, log_p_top = self.prior.terms(top_mu, top_logvar, upper[-1], None)

        def per_sample(rows_term: Tensor) -> Tensor:  # (B * L,) example-major -> (L, B)
            return rows_term.reshape(batch, num_samples).t()

        log_q = first.log_q + per_sample(log_q_upper)
        log_p = per_sample(log_p_top + log_p_below)
        # KL estimate: analytic at the top (given zN-1) where the prior has it, Monte Carlo below.
        below = first.log_q + per_sample(log_q_upper - upper[-1].log_q - log_p_below)
        kl = (below + per_sample(kl_top)).mean(0)
        elbo = bound_of(rec, kl, log_q, log_p, beta)
        return HierarchyOutput(first.z, mu, logvar, mean_decoded, rec, kl, log_q, log_p, elbo, -elbo.mean(),
                               tuple(upper))

    @torch.no_grad()
    def sample(self, num: int, condition: Tensor | None = None, generator: torch.Generator | None = None,
               device=None, mean: bool = True) -> Tensor:
        """zN from the prior, each z_i ~ p(z_i | z_i+1) down to z1, then E[x|z1] (mean=False: x ~ p(x|z1))."""
        self._check_sample_condition(num, condition)
        param = next(self.parameters())
        device = device or param.device
        z = self.prior.sample(num, None, generator, param.dtype, device)
        for decoder in reversed(self.upper_decoders):
            z = ops.reparameterize(*decoder(z, condition), generator=generator)
        decoded = self.decode(z, condition)
        return self.mean_image(decoded) if mean else self.draw_image(decoded, generator)

    @torch.no_grad()
    def importance_log_weights(self, x: Tensor, condition: Tensor | None, num_samples: int,
                               generator: torch.Generator | None = None) -> Tensor:
        """log p(x, z1..zN) - log q(z1..zN | x) for num_samples draws of the whole chain, (L, B)."""
        out = self(x, condition, num_samples=num_samples, objective="iwae", generator=generator)
        return out.rec + out.log_p - out.log_q


def layer_options(config) -> dict:
    """HierarchicalVAE's extra arguments from a TrainConfig; {} for one stochastic layer."""
    if config.stochastic_layers == 1:
        return {}
    return {"stochastic_layers": config.stochastic_layers, "upper_latent_dims": list(config.upper_latent_dims),
            "layer_architecture": config.layer_architecture, "layer_config": {"hidden": list(config.upper_hidden)}}
