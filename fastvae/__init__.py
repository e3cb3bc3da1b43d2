"""fastvae: variational autoencoders on fused C++/CUDA PyTorch ops."""

__version__ = "0.1.0"

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
    latent_terms,
    nats_to_bits_per_dim,
    reparameterize,
    sparse_input_linear,
)
from .model import VAE  # noqa: F401,E402
from .export import load  # noqa: F401,E402
