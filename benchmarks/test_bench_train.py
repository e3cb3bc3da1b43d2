"""End to end: one training step of the same MLP VAE (784-200-200-50, tanh, batch 100, Adam).

fastvae: fastvae.models.vae.VAE on the fused ops, stepped by fastvae.training.trainer.Trainer's own step code.
plain:   benchmarks/plain_vae.py, the canonical PyTorch example's model and loss.
model-eager / model-compile: fastvae.models.vae.VAE stepped by a plain loop (loss, backward,
         Adam), eagerly and as torch.compile(model, fullgraph=True); the noise is drawn
         from torch's default generator inside the compiled graph, no seed passed.
Both see the same dynamically binarized MNIST minibatches (or random binary images when
FASTVAE_MNIST names no MNIST folder). Examples per second = 100 / median step time.
"""

import pytest
import torch

from fastvae.io import data as data_lib
from fastvae.training.config import TrainConfig
from fastvae.models.vae import VAE
from fastvae.training.trainer import Trainer
import train_compare
from plain_vae import PlainVAE, plain_loss

BATCH = 100
MNIST = train_compare.DEFAULT_MNIST
HAVE_MNIST = MNIST is not None and MNIST.is_dir()


def minibatches(count=20):
    torch.manual_seed(0)
    if HAVE_MNIST:
        images = data_lib.load_dataset(f"mnist:{MNIST}", "train").images[: BATCH * count]
    else:
        images = torch.rand(BATCH * count, 1, 28, 28)
    return [data_lib.binarize(images[i * BATCH:(i + 1) * BATCH], "dynamic") for i in range(count)]


class Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def fastvae_step(tmp_path):
    # The minibatches are binarized already, as for the plain model.
    config = TrainConfig(out_dir=str(tmp_path), latent_dim=50, arch_config={"hidden": [200, 200]},
                         batch_size=BATCH, binarize="none", likelihood="bernoulli")
    dataset = data_lib.ImageDataset(torch.zeros(BATCH, 1, 28, 28), None, 0, "bench")
    trainer = Trainer(config, dataset)
    batches = Cycle(minibatches())
    return lambda: trainer.train_step(batches.next(), None, epoch=1, beta=1.0)


def plain_step():
    torch.manual_seed(0)
    model = PlainVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = Cycle(minibatches())

    def step():
        x = batches.next()
        recon, mu, logvar = model(x)
        loss = plain_loss(recon, x, mu, logvar)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def model_step(compile_model: bool):
    torch.manual_seed(0)
    model = VAE((1, 28, 28), latent_dim=50, encoder="mlp", encoder_config={"hidden": [200, 200]},
                decoder_config={"hidden": [200, 200]})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    forward = torch.compile(model, fullgraph=True) if compile_model else model
    batches = Cycle(minibatches())

    def step():
        loss = forward(batches.next()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


STEPS = {
    "fastvae": None,  # needs tmp_path, built in the test
    "plain": plain_step,
    "model-eager": lambda: model_step(False),
    "model-compile": lambda: model_step(True),
}


@pytest.mark.parametrize("provider", list(STEPS))
def test_training_step(benchmark, provider, tmp_path):
    step = fastvae_step(tmp_path) if provider == "fastvae" else STEPS[provider]()
    for _ in range(5):  # (the compiled model compiles its forward and backward here)
        step()
    benchmark.group = "train step MLP 784-200-200-50 B=100"
    benchmark.extra_info["examples"] = BATCH
    benchmark(step)


# ---------------------------------------------------------------------------- whole epochs
# `fastvae train`'s loop against the plain loop (and pythae, when installed) on real MNIST:
# train_compare.py's providers, one epoch per round. --benchmark-disable (the CI smoke run)
# runs each once on 500 images.

EPOCH_EXAMPLES = 6000


@pytest.mark.skipif(not HAVE_MNIST, reason=f"no MNIST at {MNIST} (set FASTVAE_MNIST)")
@pytest.mark.parametrize("provider", ["fastvae", "plain", "pythae"])
def test_training_epoch(benchmark, provider, tmp_path):

    if provider == "pythae" and not train_compare.pythae_available():
        pytest.skip("pythae is not installed")
    examples = 500 if benchmark.disabled else EPOCH_EXAMPLES
    images = train_compare.mnist_images(MNIST, examples)
    run = {"fastvae": lambda: train_compare.fastvae_epoch(images, str(tmp_path)),
           "plain": lambda: train_compare.plain_epoch(images),
           "pythae": lambda: train_compare.pythae_epoch(images)}[provider]()
    if not benchmark.disabled:
        run()  # warm-up
    benchmark.group = f"train epoch MLP 784-200-200-50 B=100 MNIST N={examples}"
    benchmark.extra_info["examples"] = examples
    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 5, iterations=1)
