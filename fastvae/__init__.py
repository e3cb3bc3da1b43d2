"""fastvae: variational autoencoders on fused C++/CUDA PyTorch ops.

The package in layers (docs/DESIGN.md draws them): fastvae.ops (the fused ops, their
fakes and the pure-PyTorch reference), fastvae.models (the VAE, likelihoods, objectives,
the architecture registry), fastvae.training (trainer, config, checkpoints, optimizer
calls, callbacks), fastvae.io (data, pictures, export), and the CLI on top.
"""

__version__ = "0.1.0"

from . import _compat

_compat.install()  # the flat layout's module names (fastvae.registry, ...) still import

from .ops import (  # noqa: F401
    LatentTerms,
    backend,
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    cuda_kernels_built,
    discretized_logistic_log_likelihood,
    fused_head_log_likelihood,
    gather_bernoulli,
    gaussian_kl,
    gaussian_log_likelihood,
    gaussian_log_prob,
    latent_terms,
    mixture_log_prob,
    nats_to_bits_per_dim,
    reparameterize,
    sparse_input_linear,
)
from .models.vae import VAE  # noqa: F401,E402
from . import nn  # noqa: F401,E402  (fastvae.nn.FusedMLP)
from .io.export import load  # noqa: F401,E402


def __getattr__(name: str):
    """fastvae.<old module name> (e.g. fastvae.train) as an attribute, as the flat layout had it."""
    module = _compat.moved_module(name)
    if module is None:
        raise AttributeError(f"module 'fastvae' has no attribute {name!r}")
    return module
