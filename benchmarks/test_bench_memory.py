"""Memory measurements, run with the benchmarks (they record numbers; they time nothing)."""

import torch

from memory import saved_bytes
from providers import LATENT


def test_saved_for_backward_is_only_z_mu_logvar():
    batch, dim, samples = 256, 64, 5
    mu = torch.randn(batch, dim, requires_grad=True)
    logvar = torch.randn(batch, dim, requires_grad=True)
    fused = saved_bytes(LATENT["fastvae"], mu, logvar, samples)
    eager = saved_bytes(LATENT["eager"], mu, logvar, samples)
    element = 4
    assert fused == (samples * batch * dim + 2 * batch * dim) * element  # z, mu, logvar: no eps, no std
    assert eager > fused
