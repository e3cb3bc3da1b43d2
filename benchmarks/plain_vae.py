"""A plain PyTorch VAE, written the way the canonical pytorch/examples VAE is, for comparison.

Same architecture as fastvae's `mlp` with hidden=(200, 200), tanh, latent 50 (Burda et al.'s
784-200-200-50): encoder and decoder MLPs, `reparameterize` with randn_like, a sigmoid
output with F.binary_cross_entropy summed over pixels, and the analytic KL formula.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PlainVAE(nn.Module):
    def __init__(self, pixels=784, hidden=200, latent=50):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, pixels))

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def forward(self, x):
        h = self.encoder(x.flatten(1))
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = self.reparameterize(mu, logvar)
        return torch.sigmoid(self.decoder(z)), mu, logvar


def plain_loss(recon_x, x, mu, logvar):
    """The example's loss: BCE summed over pixels and batch, plus the analytic KL; divided by the
    batch size here so that it is the same per-example objective as fastvae's."""
    bce = F.binary_cross_entropy(recon_x, x.flatten(1), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / x.shape[0]
