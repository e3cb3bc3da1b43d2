"""fastvae: variational autoencoders on fused C++/CUDA PyTorch ops."""

__version__ = "0.1.0"

from .ops import (  # noqa: F401
    LatentTerms,
    backend,
    bernoulli_log_likelihood,
    cuda_kernels_built,
    gaussian_kl,
    gaussian_log_likelihood,
    latent_terms,
    reparameterize,
)
from .model import VAE  # noqa: F401,E402
from .export import load  # noqa: F401,E402
