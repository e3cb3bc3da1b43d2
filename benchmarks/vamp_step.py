"""A VampPrior training step: fastvae.VAE(prior="vamp") against the same model in eager PyTorch.

    python benchmarks/vamp_step.py [--components 500] [--threads N] [--rounds 7] [--steps 20]

Both: Burda et al.'s MLP 784-200-200-50 (tanh), K pseudo-inputs through the encoder, the Monte
Carlo KL (log q(z|x) - log p(z), the VampPrior having no analytic one), Bernoulli likelihood,
batches of 100 binarized MNIST images (random binary ones without --mnist DIR / FASTVAE_MNIST),
torch.optim.Adam(fused=True), the loop a user writes (benchmarks/user_loop.py).
  fastvae   fastvae.VAE(..., prior="vamp", prior_components=K), objective "monte_carlo"
  eager     the same network as nn.Sequential modules; log q and log p(z) as torch.distributions
            Normal log-probs, p(z) the logsumexp over the K components (a (B, K, D) tensor)
The providers run interleaved; the table gives the median round of each, and the CPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_compare import DEFAULT_MNIST, cpu_description  # noqa: E402
from user_loop import BATCH, interleaved_rates, loop_step, minibatches  # noqa: E402

import fastvae  # noqa: E402

LATENT = 50


def fastvae_vamp_step(batches, components: int):
    torch.manual_seed(0)
    model = fastvae.VAE((1, 28, 28), latent_dim=LATENT, encoder_config={"hidden": [200, 200]},
                        decoder_config={"hidden": [200, 200]}, prior="vamp", prior_components=components)
    return loop_step(lambda x: model(x, objective="monte_carlo").loss, model.parameters(), batches)


class EagerVampVAE(nn.Module):
    def __init__(self, components: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                                     nn.Linear(200, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                                     nn.Linear(200, 784))
        self.pseudo_inputs = nn.Parameter(torch.rand(components, 1, 28, 28))

    def loss(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn_like(mu)
        log_q = Normal(mu, std).log_prob(z).sum(-1)
        means, logvars = self.encoder(self.pseudo_inputs).chunk(2, dim=-1)
        log_p = torch.logsumexp(Normal(means, torch.exp(0.5 * logvars)).log_prob(z[:, None, :]).sum(-1), -1) \
            - math.log(means.shape[0])
        rec = -F.binary_cross_entropy_with_logits(self.decoder(z), x.flatten(1), reduction="none").sum(-1)
        return -(rec + log_p - log_q).mean()


def eager_vamp_step(batches, components: int):
    torch.manual_seed(0)
    model = EagerVampVAE(components)
    return loop_step(model.loss, model.parameters(), batches)


def providers(batches, components: int) -> dict:
    return {"fastvae": fastvae_vamp_step(batches, components), "eager": eager_vamp_step(batches, components)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--components", type=int, default=500, help="K, the pseudo-inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's own choice)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=20, help="steps per provider per round")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST,
                        help="MNIST IDX folder (the default comes from $FASTVAE_MNIST; none: random binary images)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rates = interleaved_rates(providers(minibatches(mnist=args.mnist), args.components), args.rounds, args.steps)
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"CPU: {cpu_description()}; VampPrior K={args.components}; {args.rounds} rounds of {args.steps} steps, "
          f"batch {BATCH}")
    print("| step | examples/s (median round) | vs eager |\n|---|---:|---:|")
    for name, rate in median.items():
        print(f"| {name} | {rate:,.0f} | {rate / median['eager']:.2f}x |")


if __name__ == "__main__":
    main()
