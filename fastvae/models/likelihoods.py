"""Likelihoods p(x|z): one declaration each, read by decoders, the VAE, the trainer, evaluation and the CLI.

A declaration says everything fastvae needs to know about one observation model:

    name          what --likelihood and checkpoints call it
    params        the decoder's outputs per data element, in order ("logits",) or ("mean", "logvar");
                  a decoder emits len(params) values per element, parameter-major
    data          the data it models (DATA_KINDS): "binary", "8bit" (levels k/255), "unit" ([0, 1]), "real"
    binarize      whether the trainer's --binarize prepares the data for it (Bernoulli only)
    log_prob      (params, x, settings) -> log p(x|z) per sample and example, (L, B), in nats (a fused op)
    mean          params -> E[x|z], the image that samples and reconstructions show
    sample        (params, settings, generator) -> one draw x ~ p(x|z)
    bits_per_dim  whether training and evaluation also report bits per dimension (8-bit image likelihoods)
    fused_head    the fused likelihood op log_prob calls (one of fastvae.ops.FUSED_LIKELIHOODS, e.g.
                  "gaussian" for gaussian_learned too), whose fused decoder head the VAE then runs
                  (fused_head_log_prob); None: the VAE decodes and calls log_prob
    second_shift, second_min
                  how log_prob makes the second parameter from the decoder's raw output r:
                  max(r + second_shift, second_min) (None: unbounded); the fused head does the same
    reference     log_prob in plain PyTorch (fastvae/ops/reference.py), when log_prob is a fused op:
                  tests/test_properties.py checks every declared pair over shapes, dtypes and ranges

params is always a tuple of tensors shaped like the data (with leading sample dimensions);
settings is the model's dict of likelihood settings (today: "gaussian_logvar", the fixed
Gaussian's log-variance). Third-party packages add likelihoods with register_likelihood,
or through an entry point in the "fastvae.likelihoods" group (see fastvae/models/plugins.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from ..errors import UserError
from ..ops import reference
from .plugins import PluginTable, format_rows

ENTRY_POINT_GROUP = "fastvae.likelihoods"
# From narrowest to widest: data of one kind is also data of every wider kind
# (binary images are 8-bit images with levels 0 and 255, and so on).
DATA_KINDS = ("binary", "8bit", "unit", "real")
DATA_DESCRIPTIONS = {"binary": "binary {0, 1}", "8bit": "8-bit levels k/255", "unit": "[0, 1]", "real": "real"}
AUTO = "auto"
# What "auto" picks for a data set of each kind; a kind whose choice is not registered falls
# through to the next wider kind's.
AUTO_CHOICES = {"binary": "bernoulli", "8bit": "discretized_logistic", "unit": "continuous_bernoulli",
                "real": "gaussian"}


@dataclass(frozen=True)
class Likelihood:
    """The declaration of one likelihood (see the module docstring for each field)."""

    name: str
    description: str
    params: tuple[str, ...]
    data: str
    log_prob: Callable[[tuple[Tensor, ...], Tensor, dict], Tensor]
    mean: Callable[[tuple[Tensor, ...]], Tensor]
    sample: Callable[[tuple[Tensor, ...], dict, torch.Generator | None], Tensor]
    binarize: bool = False
    bits_per_dim: bool = False
    fused_head: str | None = None
    reference: Callable[[tuple[Tensor, ...], Tensor, dict], Tensor] | None = None
    second_shift: float = 0.0
    second_min: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == AUTO:
            raise ValueError(f"a likelihood name must be a non-empty string other than {AUTO!r}, got {self.name!r}")
        if not self.params or not all(isinstance(p, str) for p in self.params):
            raise ValueError(f"likelihood {self.name!r}: params must be a non-empty tuple of names, got {self.params!r}")
        if self.data not in DATA_KINDS:
            raise ValueError(f"likelihood {self.name!r}: data must be one of {DATA_KINDS}, got {self.data!r}")

    @property
    def params_per_element(self) -> int:
        return len(self.params)

    def split(self, decoded) -> tuple[Tensor, ...]:
        """A decoder's output (one tensor, or a tuple for several parameters) as the tuple params."""
        params = decoded if isinstance(decoded, tuple) else (decoded,)
        if len(params) != len(self.params):
            raise ValueError(f"likelihood {self.name!r} needs {len(self.params)} decoder outputs "
                             f"{self.params}, got {len(params)}")
        return params

    def fused_head_log_prob(self, h: Tensor, weight: Tensor, bias: Tensor | None, x: Tensor, settings: dict, *,
                            precompute_grads: bool = False) -> Tensor:
        """log_prob of the output layer (weight, bias) applied to the decoder's last hidden layer h,
        (L, B), with the layer fused into the likelihood (fastvae.ops.fused_head_log_likelihood): the
        same numbers, without the (L, B, *shape) decoder output. settings["gaussian_logvar"] is the
        second parameter of a two-parameter likelihood whose layer gives only the first."""
        if self.fused_head is None:
            raise ValueError(f"likelihood {self.name!r} declares no fused head (fused_head=None)")
        return ops.fused_head_log_likelihood(
            h, weight, bias, x, self.fused_head, float(settings.get("gaussian_logvar", 0.0)),
            second_shift=self.second_shift, second_min=self.second_min, precompute_grads=precompute_grads,
            check_range=False)  # the trainer checked the data once (check_data)

    def check_data(self, x: Tensor, what: str = "the data") -> None:
        """Raise ValueError unless x is data this likelihood models."""
        if not _all_fit(x, "real"):
            raise ValueError(f"{what} contains NaN or infinite values")
        if not _all_fit(x, self.data):
            kind = data_kind(x)
            raise ValueError(f"the {self.name} likelihood models {DATA_DESCRIPTIONS[self.data]} data, but {what} "
                             f"is {DATA_DESCRIPTIONS[kind]}; choose another --likelihood (see `fastvae list`)")


LIKELIHOODS: PluginTable[Likelihood] = PluginTable(
    "likelihood", ENTRY_POINT_GROUP, Likelihood, code_of=lambda item: item.log_prob,
    builtin_module="fastvae.models.likelihoods")


def register_likelihood(likelihood: Likelihood, *, override: bool = False) -> Likelihood:
    """Make `likelihood` available by name to VAE, decoders, the trainer and --likelihood."""
    return LIKELIHOODS.register(likelihood, override=override)


def get(name: str) -> Likelihood:
    """The declaration registered as name (built-in or plugin); unknown names raise LookupError."""
    if name == AUTO:
        raise ValueError(f"likelihood {AUTO!r} is chosen from the data; resolve it with resolve_auto(images) first")
    return LIKELIHOODS.get(name)


def names() -> tuple[str, ...]:
    return LIKELIHOODS.names()


def reload_plugins() -> None:
    LIKELIHOODS.reload()


# ----------------------------------------------------------------------------- data kinds
_CHUNK = 1 << 22  # elements checked at once: a data set is checked without copying it whole


def _fits(chunk: Tensor, kind: str) -> bool:
    """Whether every value of chunk is data of `kind` (NaN fits none)."""
    if kind == "real":
        return bool(torch.isfinite(chunk).all())
    if kind == "binary":
        return bool(((chunk == 0) | (chunk == 1)).all())
    in_unit = bool(((chunk >= 0) & (chunk <= 1)).all())
    if kind == "unit" or not in_unit:
        return in_unit
    levels = chunk.float() * 255  # float32 holds k/255 to within 1e-7 of the level: far inside the tolerance
    return bool(((levels - levels.round()).abs() < 1e-3).all())


def _all_fit(x: Tensor, kind: str) -> bool:
    return all(_fits(chunk, kind) for chunk in x.detach().reshape(-1).split(_CHUNK))


def data_kind(x: Tensor) -> str:
    """The narrowest of DATA_KINDS that x belongs to ("real" also for NaN and inf)."""
    return next((kind for kind in DATA_KINDS[:-1] if _all_fit(x, kind)), "real")


def resolve_auto(images: Tensor, binary_benchmark: bool = False) -> tuple[str, str]:
    """The likelihood "auto" picks for a data set, and why: (name, reason).

    binary_benchmark: the data set is one of the MNIST-style benchmarks that the VAE papers
    model as binary (dynamically binarized), so it gets the Bernoulli whatever its grey levels.
    """
    kind = "binary" if binary_benchmark else data_kind(images)
    reason = "a binary benchmark" if binary_benchmark else f"{DATA_DESCRIPTIONS[kind]} data"
    registered = names()
    for wider in DATA_KINDS[DATA_KINDS.index(kind):]:
        if AUTO_CHOICES[wider] in registered:
            return AUTO_CHOICES[wider], reason
    raise NoLikelihoodForData(f"no registered likelihood models {DATA_DESCRIPTIONS[kind]} data")


class NoLikelihoodForData(UserError, LookupError):
    """likelihood "auto" found no registered likelihood for the data; pass --likelihood."""


def bits_per_dim(nats: float, shape) -> float:
    """A negative log-likelihood (or negative ELBO) per example in nats, as bits per dimension of
    an example of `shape`: the figure image papers report."""
    return ops.nats_to_bits_per_dim(nats, math.prod(shape))


def format_table() -> str:
    """The likelihood part of `fastvae list`."""
    rows = [("LIKELIHOOD", "PARAMETERS", "DATA", "SOURCE", "DESCRIPTION")]
    for entry in LIKELIHOODS.entries():
        item = entry.item
        data = DATA_DESCRIPTIONS[item.data] + (", binarized" if item.binarize else "")
        rows.append((item.name, ",".join(item.params), data, entry.source, item.description))
    return format_rows(rows)


# ----------------------------------------------------------------------------- built-ins
def _flat(params, x):
    """Decoder outputs (..., B, *shape) and data (B, *shape) as (..., B, P) and (B, P), as reference takes them."""
    pixels, numel = x.dim() - 1, math.prod(x.shape[1:])
    return tuple(p.flatten(-pixels) if pixels else p.unsqueeze(-1) for p in params), x.reshape(x.shape[0], numel)


def _bernoulli_reference(params, x, settings):
    (logits,), x = _flat(params, x)
    return reference.bernoulli_log_prob(logits, x)


def _gaussian_reference(params, x, settings):
    (mean,), x = _flat(params, x)
    return reference.gaussian_log_prob(mean, x, None, float(settings.get("gaussian_logvar", 0.0)))


def _gaussian_learned_reference(params, x, settings):
    (mean, logvar), x = _flat(params, x)
    return reference.gaussian_log_prob(mean, x, logvar)


def _continuous_bernoulli_reference(params, x, settings):
    (logits,), x = _flat(params, x)
    return reference.continuous_bernoulli_log_prob(logits, x)


def _discretized_logistic_reference(params, x, settings):
    (mean, log_scale), x = _flat(params, x)
    return reference.discretized_logistic_log_prob(mean, x, _bounded(log_scale))


def _bernoulli_log_prob(params, x, settings):
    # The trainer checked the data once (check_data); no pass over x per step.
    return ops.bernoulli_log_likelihood(params[0], x, check_range=False)


def _bernoulli_mean(params):
    return torch.sigmoid(params[0])


def _bernoulli_sample(params, settings, generator):
    return torch.bernoulli(torch.sigmoid(params[0]), generator=generator)


def _gaussian_log_prob(params, x, settings):
    return ops.gaussian_log_likelihood(params[0], x, float(settings.get("gaussian_logvar", 0.0)))


def _gaussian_learned_log_prob(params, x, settings):
    mean, logvar = params
    return ops.gaussian_log_likelihood(mean, x, logvar)


def _first(params):
    return params[0]


def _gaussian_draw(mean: Tensor, logvar: Tensor | float, generator) -> Tensor:
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)) * noise


def _gaussian_sample(params, settings, generator):
    return _gaussian_draw(params[0], float(settings.get("gaussian_logvar", 0.0)), generator)


def _gaussian_learned_sample(params, settings, generator):
    mean, logvar = params
    return _gaussian_draw(mean, logvar, generator)


BERNOULLI = register_likelihood(Likelihood(
    name="bernoulli",
    description="Bernoulli from logits, for binary pixels (grey data is binarized, see --binarize)",
    params=("logits",), data="unit", binarize=True, fused_head="bernoulli",
    log_prob=_bernoulli_log_prob, mean=_bernoulli_mean, sample=_bernoulli_sample, reference=_bernoulli_reference,
))

GAUSSIAN = register_likelihood(Likelihood(
    name="gaussian",
    description="Gaussian with one fixed variance for every element (--gaussian-logvar)",
    params=("mean",), data="real", fused_head="gaussian",
    log_prob=_gaussian_log_prob, mean=_first, sample=_gaussian_sample, reference=_gaussian_reference,
))

GAUSSIAN_LEARNED = register_likelihood(Likelihood(
    name="gaussian_learned",
    description="Gaussian with a mean and a log-variance per element from the decoder",
    params=("mean", "logvar"), data="real", fused_head="gaussian",
    log_prob=_gaussian_learned_log_prob, mean=_first, sample=_gaussian_learned_sample,
    reference=_gaussian_learned_reference,
))


def _continuous_bernoulli_log_prob(params, x, settings):
    return ops.continuous_bernoulli_log_likelihood(params[0], x, check_range=False)


def _half_langevin(u: Tensor) -> Tensor:
    """(coth(u) - 1/u) / 2, the Langevin function halved, exact near u = 0 (its Taylor series there)."""
    small = u.abs() < 0.1
    safe = torch.where(small, torch.ones_like(u), u)
    u2 = u * u
    series = u * (1 / 3 + u2 * (-1 / 45 + u2 * (2 / 945 - u2 / 4725)))
    return 0.5 * torch.where(small, series, 1 / torch.tanh(safe) - 1 / safe)


def _continuous_bernoulli_mean(params):
    # E[x] = lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda)), lambda = sigmoid(eta); in the logit
    # eta this is 1/2 + (coth(eta/2) - 2/eta) / 2: no cancellation at lambda = 1/2, no clamping at +-100.
    return 0.5 + _half_langevin(0.5 * params[0])


def _continuous_bernoulli_sample(params, settings, generator):
    # Inverse CDF: x = log1p(u * expm1(eta)) / eta for eta <= 0 (u uniform); the law of 1 - x
    # under -eta is that of x under eta, so positive logits use the mirror image.
    eta = params[0]
    u = torch.rand(eta.shape, generator=generator, dtype=eta.dtype, device=eta.device)
    a = -eta.abs()
    tiny = a > -1e-6
    safe = torch.where(tiny, -torch.ones_like(a), a)
    y = torch.where(tiny, u, torch.log1p(u * torch.expm1(safe)) / safe)
    return torch.where(eta > 0, 1 - y, y)


# The decoder's second output r gives the logistic's log-scale as r + LOG_SCALE_SHIFT, bounded below.
# The shift makes an untrained decoder (r near 0) start at a scale of 0.05, about 13 levels, near the
# spread of real pixels: at scale 1 the likelihood is so flat in the mean that the decoder learns the
# data's average colour and ignores z (tried: 8 bits per dimension after 360 steps, KL near 0).
# The bound is PixelCNN++'s (-7 for data in [-1, 1], so -7 - log 2 for [0, 1]): a scale far below
# one level (log 1/255 = -5.5) adds nothing for data on the levels, and early in training an
# unbounded one can run off to -100 in a few steps, where the float32 log-likelihood overflows.
LOG_SCALE_SHIFT = -3.0
MIN_LOG_SCALE = -7.0 - math.log(2.0)


def _bounded(raw_log_scale: Tensor) -> Tensor:
    """The logistic's log-scale from the decoder's output."""
    return (raw_log_scale + LOG_SCALE_SHIFT).clamp(min=MIN_LOG_SCALE)


def _discretized_logistic_log_prob(params, x, settings):
    mean, raw_log_scale = params
    if mean.dtype in (torch.float16, torch.bfloat16):
        # Shifted in half precision, a log-scale near -3 would be rounded to 0.002 (bfloat16: 0.016);
        # the op computes in float32 for these inputs anyway.
        mean, raw_log_scale = mean.float(), raw_log_scale.float()
    return ops.discretized_logistic_log_likelihood(mean, _bounded(raw_log_scale), x, check_range=False)


def _discretized_logistic_mean(params):
    return params[0].clamp(0.0, 1.0)


def _discretized_logistic_sample(params, settings, generator):
    mean, log_scale = params
    u = torch.rand(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device).clamp(1e-6, 1 - 1e-6)
    continuous = mean + torch.exp(_bounded(log_scale)) * (torch.log(u) - torch.log1p(-u))
    return (continuous * 255).round().clamp(0, 255) / 255


CONTINUOUS_BERNOULLI = register_likelihood(Likelihood(
    name="continuous_bernoulli",
    description="continuous Bernoulli from logits (Loaiza-Ganem & Cunningham 2019), for grey levels in [0, 1]",
    params=("logits",), data="unit", fused_head="continuous_bernoulli",
    log_prob=_continuous_bernoulli_log_prob, mean=_continuous_bernoulli_mean, sample=_continuous_bernoulli_sample,
    reference=_continuous_bernoulli_reference,
))

DISCRETIZED_LOGISTIC = register_likelihood(Likelihood(
    name="discretized_logistic",
    description="discretized logistic over the 256 levels of 8-bit images (Salimans et al. 2017); "
                "log-scale = log_scale - 3, bounded below by -7.7; pictures show its location",
    params=("mean", "log_scale"), data="8bit", bits_per_dim=True, fused_head="discretized_logistic",
    second_shift=LOG_SCALE_SHIFT, second_min=MIN_LOG_SCALE,
    log_prob=_discretized_logistic_log_prob, mean=_discretized_logistic_mean, sample=_discretized_logistic_sample,
    reference=_discretized_logistic_reference,
))
