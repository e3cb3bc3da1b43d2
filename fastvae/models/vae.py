"""The VAE model: registry encoder and decoder around the fused ops.

Every loss term is per example, summed over data and latent dimensions, in nats:
    rec[l, b]   = log p(x_b | z_lb)        (fused likelihood op)
    kl[b]       = KL(q(z|x_b) || p(z))     (analytic where the prior has one, as N(0, I) in the fused
                                            latent op; else mean_l (log_q - log_p))
    log_q[l, b] = log q(z_lb | x_b)        (fused latent op)
    log_p[l, b] = log p(z_lb)              (the prior; N(0, I): fused latent op)
The likelihood (fastvae/models/likelihoods.py), the prior (fastvae/models/priors.py) and the
objective (fastvae/models/objectives.py) are declarations looked up by name, built-in or from a
plugin. Built-in objectives (docs/DESIGN.md section 1):
    "analytic"    SGVB-B, the default:  elbo = mean_l rec - beta*kl
    "monte_carlo" SGVB-A:               elbo = mean_l (rec + beta*(log_p - log_q))
    "iwae"        Burda et al. 2016:    logsumexp_l (rec + log_p - log_q) - log L
The training loss is -mean_b elbo: averaged over the batch, so learning rates do not
depend on the batch size, while the reported ELBO stays in per-example nats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import likelihoods, objectives, priors, registry
from .. import ops, tuning
from ..io.data import one_hot


@dataclass
class VAEOutput:
    z: Tensor           # (L, B, D)
    mu: Tensor          # (B, D)
    logvar: Tensor      # (B, D)
    _decoded: Tensor | Callable[[], Tensor]  # see `decoded`
    rec: Tensor         # (L, B): log p(x|z)
    kl: Tensor          # (B,)
    log_q: Tensor       # (L, B)
    log_p: Tensor       # (L, B)
    elbo: Tensor        # (B,): the objective's bound per example (with beta applied)
    loss: Tensor        # scalar: -mean_b elbo

    @property
    def decoded(self) -> Tensor:
        """Logits or means, (L, B, *input_shape). With the fused head the forward never held them:
        the first access runs the decoder again on z (same numbers, differentiable)."""
        if callable(self._decoded):
            self._decoded = self._decoded()
        return self._decoded


class VAE(nn.Module):
    """A VAE with a Gaussian posterior, a registered prior (N(0, I) by default) and a registry encoder/decoder.

    encoder, decoder: registered names (see `fastvae list`) or ready nn.Modules following
    the registry's Encoder/Decoder contract. likelihood: a registered likelihood name (see
    `fastvae list` and fastvae/models/likelihoods.py), e.g. "bernoulli" (decoder gives logits),
    "gaussian" (decoder gives means; the fixed log-variance is `gaussian_logvar`) or
    "gaussian_learned" (decoder gives means and log-variances). prior: a registered prior name
    ("standard", "mog", "vamp", a plugin's; see fastvae/models/priors.py) or a ready LatentPrior;
    prior_components: K for priors with components (default: the prior's declared one).
    """

    stochastic_layers = 1  # fastvae.models.hierarchy.HierarchicalVAE has more

    def __init__(
        self,
        input_shape,
        latent_dim: int = 50,
        encoder="mlp",
        decoder=None,
        likelihood: str = "bernoulli",
        encoder_config: dict | None = None,
        decoder_config: dict | None = None,
        condition_dim: int = 0,
        gaussian_logvar: float = 0.0,
        prior="standard",
        prior_components: int | None = None,
    ):
        super().__init__()
        input_shape = tuple(int(s) for s in input_shape)
        self.likelihood_spec = likelihoods.get(likelihood)
        # forward looks objectives up by name; loading their plugins now keeps that lookup a dict
        # read, which torch.compile(model, fullgraph=True) can trace on the first call.
        objectives.OBJECTIVES.group.ensure_loaded()
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        if condition_dim < 0:
            raise ValueError(f"condition_dim must be >= 0, got {condition_dim}")
        if isinstance(prior, str):
            prior_components = priors.components_of(prior, prior_components)  # a bad prior fails before any work
        elif not isinstance(prior, priors.LatentPrior):
            raise TypeError(f"prior must be a registered prior name or a fastvae.models.priors.LatentPrior, "
                            f"got {prior!r}")
        decoder = encoder if decoder is None else decoder
        self.input_shape = input_shape
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.condition_dim = condition_dim
        self.gaussian_logvar = float(gaussian_logvar)
        common = {"latent_dim": latent_dim, "condition_dim": condition_dim}
        built_encoder_config, built_decoder_config = encoder_config, decoder_config
        if encoder == "mlp" and decoder == "mlp":
            # The optional fast paths the configs leave unset, as fastvae/tuning.py decides for this CPU.
            shape = tuning.mlp_shape(input_shape, latent_dim, likelihood, condition_dim, encoder_config,
                                     decoder_config)
            built_encoder_config, built_decoder_config = tuning.fill_mlp_configs(shape, encoder_config,
                                                                                 decoder_config)
        self.encoder = (
            registry.build_encoder(encoder, input_shape=input_shape, **common, **(built_encoder_config or {}))
            if isinstance(encoder, str)
            else encoder
        )
        self.decoder = (
            registry.build_decoder(
                decoder, output_shape=input_shape, likelihood=likelihood, **common, **(built_decoder_config or {})
            )
            if isinstance(decoder, str)
            else decoder
        )
        # Built after the encoder and decoder: their initial weights do not depend on the prior.
        self.prior = (priors.build_prior(prior, latent_dim=latent_dim, input_shape=input_shape,
                                         condition_dim=condition_dim, components=prior_components)
                      if isinstance(prior, str) else prior)
        self._warned_monte_carlo_kl = False
        # Plain values only: enough to rebuild the model from a checkpoint (named architectures).
        self.config = {
            "input_shape": list(input_shape),
            "latent_dim": latent_dim,
            "encoder": encoder if isinstance(encoder, str) else None,
            "decoder": decoder if isinstance(decoder, str) else None,
            "likelihood": likelihood,
            "encoder_config": dict(encoder_config or {}),
            "decoder_config": dict(decoder_config or {}),
            "condition_dim": condition_dim,
            "gaussian_logvar": self.gaussian_logvar,
            "prior": prior if isinstance(prior, str) else None,
            "prior_components": prior_components if isinstance(prior, str) else None,
        }

    @classmethod
    def from_config(cls, config: dict) -> VAE:
        # Configurations written before priors existed have no "prior": theirs was N(0, I).
        custom_prior = config.get("prior", priors.STANDARD) is None
        if config.get("encoder") is None or config.get("decoder") is None or custom_prior:
            raise ValueError("this model was built from custom modules, not registry names; rebuild it yourself")
        if cls is VAE and config.get("stochastic_layers", 1) != 1:  # configs without the key: one layer
            from .hierarchy import HierarchicalVAE

            cls = HierarchicalVAE
        return cls(**config)

    @classmethod
    def from_pretrained(cls, folder) -> VAE:
        """The model of a folder written by save_pretrained / `fastvae export` (safetensors, no pickle)."""
        from ..io.export import load_pretrained

        return load_pretrained(folder)[0]

    def save_pretrained(self, folder) -> None:
        """Write model.safetensors and config.json into `folder` (see fastvae.io.export)."""
        from ..io.export import save_pretrained

        save_pretrained(self, folder)

    # ------------------------------------------------------------------
    def _check_input(self, x: Tensor, condition: Tensor | None) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (batch, *{self.input_shape}), got {tuple(x.shape)}")
        if self.condition_dim and (condition is None or condition.shape != (x.shape[0], self.condition_dim)):
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"this model is conditional: condition must have shape ({x.shape[0]}, "
                             f"{self.condition_dim}), got {got}")
        if not self.condition_dim and condition is not None:
            raise ValueError("this model is not conditional (condition_dim=0) but a condition was given")

    def encode(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|x), each (B, latent_dim)."""
        return self.encoder(x, condition)

    def decode(self, z: Tensor, condition: Tensor | None = None):
        """Decoder output for z of shape (..., latent_dim): logits, means, or (means, logvars)."""
        lead = z.shape[:-1]
        flat_z = z.reshape(-1, self.latent_dim)
        flat_c = None
        if condition is not None:
            flat_c = condition.expand(*lead, condition.shape[-1]).reshape(-1, condition.shape[-1])
        out = self.decoder(flat_z, flat_c)
        if isinstance(out, tuple):
            return tuple(o.reshape(*lead, *self.input_shape) for o in out)
        return out.reshape(*lead, *self.input_shape)

    @property
    def likelihood_settings(self) -> dict:
        """The model's settings a likelihood's functions may read (see fastvae/models/likelihoods.py)."""
        return {"gaussian_logvar": self.gaussian_logvar}

    def log_likelihood(self, decoded, x: Tensor) -> Tensor:
        """log p(x|z) per sample and example, (L, B), from the decoder's output."""
        spec = self.likelihood_spec
        return spec.log_prob(spec.split(decoded), x, self.likelihood_settings)

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
    ) -> VAEOutput:
        """Encode, sample L latents per example in the fused op, decode, and score.

        row_offset: global index of x's first example, for data-parallel shards (the
        noise of an example then does not depend on how the batch was split).
        objective_settings: values of the objective's declared settings (beta_tcvae: alpha, gamma,
        dataset_size); an objective without settings takes none.
        """
        spec = objectives.get(objective)  # an unknown name or setting fails before any work
        settings = spec.settings_with(objective_settings)
        self._check_input(x, condition)
        mu, logvar = self.encode(x, condition)
        latent = ops.latent_terms(mu, logvar, num_samples, generator=generator, stl=stl, row_offset=row_offset)
        kl, log_p = self.prior_terms(mu, logvar, latent)
        if objective == "analytic" and not self.prior.analytic_kl:
            self._warn_monte_carlo_kl()
        mean_decoded, rec = self._decode_and_score(latent.z, condition, x, objective)
        latents = None if spec.settings is None else objectives.LatentBatch(latent.z, mu, logvar, settings)
        elbo = spec.evaluate(rec, kl, latent.log_q, log_p, beta, latents)
        return VAEOutput(latent.z, mu, logvar, mean_decoded, rec, kl, latent.log_q, log_p, elbo, -elbo.mean())

    def prior_terms(self, mu: Tensor, logvar: Tensor, latent: ops.LatentTerms) -> tuple[Tensor, Tensor]:
        """(kl (B,), log p(z) (L, B)) of the prior for the fused latent op's samples (see priors.LatentPrior.terms)."""
        return self.prior.terms(mu, logvar, latent, self.encoder)

    def log_prior(self, z: Tensor) -> Tensor:
        """log p(z) under the model's prior, summed over the latent dimension: z (..., D) -> (...)."""
        return self.prior.log_prob(z, self.encoder)

    def _warn_monte_carlo_kl(self) -> None:
        # The "analytic" objective with a prior that has no closed-form KL: its kl term is the Monte
        # Carlo estimate, which makes the bound SGVB-A's. Said once per model, outside compiled code.
        if self._warned_monte_carlo_kl or torch.compiler.is_compiling():
            return
        self._warned_monte_carlo_kl = True
        warnings.warn(priors.monte_carlo_kl_note(self.config["prior"] or type(self.prior).__name__),
                      priors.MonteCarloKLWarning, stacklevel=2)

    def _decode_and_score(self, z: Tensor, condition: Tensor | None, x: Tensor, objective: str):
        """(logits or means, or a function computing them; rec (L, B)).

        A decoder that takes the fused head (registry.Decoder, "Fused head") gives its last hidden
        layer, and the fused op scores it with the output layer folded in: the (L, B, *input_shape)
        decoder output and its gradient are never held. Any other decoder: decode, then the
        likelihood op.
        """
        spec = self.likelihood_spec
        layer = registry.fused_output_layer(self.decoder) if spec.fused_head is not None else None
        if layer is None:
            decoded = self.decode(z, condition)
            return (decoded[0] if isinstance(decoded, tuple) else decoded), self.log_likelihood(decoded, x)
        flat_z = z.reshape(-1, self.latent_dim)
        flat_c = None if condition is None else condition.expand(*z.shape[:-1], condition.shape[-1]).reshape(
            -1, condition.shape[-1])
        h = self.decoder.hidden(flat_z, flat_c)
        h = h.reshape(*z.shape[:-1], h.shape[-1])
        # Every row's incoming gradient is the same for the averaged bounds, so the head's gradients
        # are computed in its forward; IWAE weights rows differently, so its backward recomputes.
        rec = spec.fused_head_log_prob(h, layer.weight, layer.bias, x, self.likelihood_settings,
                                       precompute_grads=objectives.get(objective).rows_weighted_equally)

        def decoded():
            out = self.decode(z, condition)
            return out[0] if isinstance(out, tuple) else out

        return decoded, rec

    # ------------------------------------------------------------------
    def mean_image(self, decoded) -> Tensor:
        """E[x|z] from the decoder's output, as the likelihood declares it (sigmoid of logits, means...)."""
        return self.likelihood_spec.mean(self.likelihood_spec.split(decoded))

    def draw_image(self, decoded, generator: torch.Generator | None = None) -> Tensor:
        """One draw x ~ p(x|z) from the decoder's output."""
        spec = self.likelihood_spec
        return spec.sample(spec.split(decoded), self.likelihood_settings, generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """E[x|z] at z = mu (the posterior mean), shaped like x."""
        self._check_input(x, condition)
        mu, _ = self.encode(x, condition)
        return self.mean_image(self.decode(mu, condition))

    @torch.no_grad()
    def sample(self, num: int, condition: Tensor | None = None, generator: torch.Generator | None = None,
               device=None, mean: bool = True) -> Tensor:
        """E[x|z] for z drawn from the model's prior: (num, *input_shape); mean=False: x ~ p(x|z) instead."""
        self._check_sample_condition(num, condition)
        param = next(self.parameters())
        z = self.prior.sample(num, self.encoder, generator, param.dtype, device or param.device)
        decoded = self.decode(z, condition)
        return self.mean_image(decoded) if mean else self.draw_image(decoded, generator)

    def _check_sample_condition(self, num: int, condition: Tensor | None) -> None:
        if self.condition_dim and (condition is None or condition.shape != (num, self.condition_dim)):
            raise ValueError(f"this model is conditional: condition must have shape ({num}, {self.condition_dim})")

    @torch.no_grad()
    def sample_per_class(self, per_class: int, generator: torch.Generator | None = None) -> Tensor:
        """Conditional models: `per_class` prior samples of every class, class by class
        ((condition_dim * per_class, *input_shape); a grid with `per_class` columns has one row per class)."""
        if not self.condition_dim:
            raise ValueError("sampling per class needs a conditional model (condition_dim > 0)")
        classes = torch.arange(self.condition_dim).repeat_interleave(per_class)
        return self.sample(len(classes), one_hot(classes, self.condition_dim), generator=generator)

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, steps: int = 8, condition: Tensor | None = None) -> Tensor:
        """E[x|z] along the straight line between the posterior means of x1 and x2: (steps, *input_shape)."""
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        pair = torch.stack([x1, x2])
        cond = None if condition is None else condition.expand(2, -1)
        self._check_input(pair, cond)
        mu, _ = self.encode(pair, cond)
        weights = torch.linspace(0, 1, steps, dtype=mu.dtype, device=mu.device).unsqueeze(1)
        z = (1 - weights) * mu[0] + weights * mu[1]
        cond_steps = None if condition is None else condition.expand(steps, -1)
        return self.mean_image(self.decode(z, cond_steps))

    @torch.no_grad()
    def traverse(self, x: Tensor, dims, steps: int = 9, span: float = 3.0, condition: Tensor | None = None) -> Tensor:
        """E[x|z] with one latent dimension at a time swept over mu_d - span .. mu_d + span around the
        posterior mean mu of the single example x, the others held at mu: (len(dims), steps, *input_shape)."""
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        dims = [int(d) for d in dims]
        bad = [d for d in dims if not 0 <= d < self.latent_dim]
        if bad or not dims:
            raise ValueError(f"dims must be latent dimensions in 0..{self.latent_dim - 1}, got {dims}")
        cond = None if condition is None else condition.reshape(1, -1)
        self._check_input(x.unsqueeze(0), cond)
        mu, _ = self.encode(x.unsqueeze(0), cond)
        offsets = torch.linspace(-span, span, steps, dtype=mu.dtype, device=mu.device)
        z = mu.expand(len(dims), steps, self.latent_dim).clone()
        for row, d in enumerate(dims):
            z[row, :, d] += offsets
        return self.mean_image(self.decode(z, None if cond is None else cond.expand(len(dims), steps, -1)))


def bound(objective: str, rec: Tensor, kl: Tensor, log_q: Tensor, log_p: Tensor, beta: float = 1.0,
          latents: objectives.LatentBatch | None = None) -> Tensor:
    """The per-example lower bound of the registered `objective` from the per-sample terms (L, B)
    (and, for an objective with settings, the batch's latents)."""
    return objectives.get(objective).evaluate(rec, kl, log_q, log_p, beta, latents)
