"""The prior ops against eager PyTorch: the providers the prior benchmarks time, and the bytes
each keeps for backward (counted, not timed).

    python benchmarks/priors_memory.py     # prints the saved-for-backward table (markdown)

Providers: fastvae (the fused op) and eager (the formula a VAE written in eager PyTorch uses:
for the mixture, Normal log-probs of z[:, None] against the K components, then logsumexp, which
keeps (B, K, D) tensors for backward). Saved bytes are counted with
torch.autograd.graph.saved_tensors_hooks (each storage once), as benchmarks/memory.py does.
"""

import math
import sys
from pathlib import Path

import torch
from torch.distributions import Normal

import fastvae

sys.path.insert(0, str(Path(__file__).parent))
from memory import saved_bytes  # noqa: E402

MIXTURE_SIZE = (100, 500, 50)  # B, K, D: a VampPrior's K = 500 pseudo-inputs on a 50-d latent
LOG_2PI = math.log(2 * math.pi)


def kl_eager(mu, logvar, prior_mu, prior_logvar):
    diff = mu - prior_mu
    return 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + diff * diff) / torch.exp(prior_logvar) - 1).sum(-1)


def log_prob_eager(z, mu, logvar):
    return (-0.5 * ((z - mu) ** 2 / torch.exp(logvar) + logvar + LOG_2PI)).sum(-1)


def mixture_eager(z, means, logvars, log_weights):
    log_n = Normal(means, torch.exp(0.5 * logvars)).log_prob(z[:, None]).sum(-1)  # (B, K)
    return torch.logsumexp(torch.log_softmax(log_weights, 0) + log_n, -1)


PRIOR_KL = {"fastvae": fastvae.gaussian_kl, "eager": kl_eager}
LOG_PROB = {"fastvae": fastvae.gaussian_log_prob, "eager": log_prob_eager}
MIXTURE = {"fastvae": fastvae.mixture_log_prob, "eager": mixture_eager}


def gaussian_inputs(batch, dim, count, dtype=torch.float32):
    """`count` (batch, dim) leaves that require grad: the operands of the KL or the log-density."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, dim, generator=gen, dtype=dtype).requires_grad_() for _ in range(count))


def mixture_inputs(batch, components, dim, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, dim, generator=gen, dtype=dtype)
    means = torch.randn(components, dim, generator=gen, dtype=dtype)
    logvars = 0.5 * torch.randn(components, dim, generator=gen, dtype=dtype)
    log_weights = torch.randn(components, generator=gen, dtype=dtype)
    return tuple(t.requires_grad_() for t in (z, means, logvars, log_weights))


def mixture_saved_bytes(provider: str, size=MIXTURE_SIZE) -> int:
    return saved_bytes(MIXTURE[provider], *mixture_inputs(*size))


def main():
    batch, components, dim = MIXTURE_SIZE
    print(f"| mixture_log_prob B={batch} K={components} D={dim} float32 | saved for backward (KiB) |\n|---|---:|")
    for provider in MIXTURE:
        print(f"| {provider} | {mixture_saved_bytes(provider) / 1024:.1f} |")


if __name__ == "__main__":
    main()
