"""`toy_learned_gaussian`: a learned diagonal Gaussian prior N(m, e^s), declared by a plugin.

Its KL from the diagonal Gaussian posterior is closed-form, so it sets analytic_kl and the
"analytic" objective uses its KL as it is (no Monte Carlo estimate, no warning). Plain PyTorch.
"""

import math

import torch
from torch import nn

from fastvae.models.priors import LatentPrior, Prior


class LearnedGaussianPrior(LatentPrior):
    analytic_kl = True

    def __init__(self, latent_dim):
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(latent_dim))
        self.logvar = nn.Parameter(torch.zeros(latent_dim))

    def log_prob(self, z, encoder):
        return -0.5 * ((z - self.mean) ** 2 * torch.exp(-self.logvar) + self.logvar + math.log(2 * math.pi)).sum(-1)

    def kl(self, mu, logvar, encoder):
        ratio = (logvar.exp() + (mu - self.mean) ** 2) * torch.exp(-self.logvar)
        return 0.5 * (self.logvar - logvar + ratio - 1).sum(-1)

    def sample(self, num, encoder, generator, dtype, device):
        eps = torch.randn(num, self.mean.shape[0], generator=generator, dtype=dtype, device=device)
        return self.mean + torch.exp(0.5 * self.logvar) * eps


def build(*, latent_dim, input_shape, condition_dim, components):
    return LearnedGaussianPrior(latent_dim)


TOY_LEARNED_GAUSSIAN = Prior("toy_learned_gaussian", "learned diagonal Gaussian N(m, e^s) (toy plugin)", build)
