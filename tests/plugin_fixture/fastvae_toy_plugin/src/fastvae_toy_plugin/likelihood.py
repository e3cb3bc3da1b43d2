"""`toy_laplace`: a Laplace likelihood with a learned scale, declared by a plugin.

Its log-probability is plain PyTorch (a plugin cannot add a fused op without C++); fastvae
needs nothing else from it: the decoders give it two outputs per element because its
declaration names two parameters.
"""

import math

import torch

from fastvae.likelihoods import Likelihood


def log_prob(params, x, settings):
    mean, log_scale = params
    per_element = -(x - mean).abs() * torch.exp(-log_scale) - log_scale - math.log(2.0)
    return per_element.flatten(-x.dim() + 1).sum(-1)


def mean(params):
    return params[0]


def sample(params, settings, generator):
    location, log_scale = params
    u = torch.rand(location.shape, generator=generator, dtype=location.dtype, device=location.device) - 0.5
    return location - torch.exp(log_scale) * torch.sign(u) * torch.log1p(-2 * u.abs())


TOY_LAPLACE = Likelihood(
    name="toy_laplace",
    description="Laplace with a learned scale (toy plugin)",
    params=("mean", "log_scale"),
    data="real",
    log_prob=log_prob,
    mean=mean,
    sample=sample,
)
