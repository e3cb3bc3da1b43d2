"""Dynamic binarization of a minibatch: fastvae.gather_bernoulli against what a PyTorch loop does.

    pytest benchmarks/test_bench_binarize.py --benchmark-only

A batch of 100 rows of a 60,000 x 784 float32 data set (MNIST's size), index drawn at random:
- fastvae: gather_bernoulli (gather and Philox draw in one pass);
- rand: index_select into a buffer, torch.rand into another, u < p in place (fastvae's trainer
  before gather_bernoulli);
- bernoulli: images[index] then torch.bernoulli (the pytorch/examples-style loop).
"""

import pytest
import torch

import fastvae

ROWS, PIXELS, BATCH = 60_000, 784, 100


def providers(images, index):
    generator = torch.Generator().manual_seed(0)
    batch, uniforms = images.new_empty(BATCH, PIXELS), images.new_empty(BATCH, PIXELS)

    def rand_in_place():
        x = torch.index_select(images, 0, index, out=batch)
        torch.rand(x.shape, generator=generator, out=uniforms)
        return torch.lt(uniforms, x, out=x)

    return {
        "fastvae": lambda: fastvae.gather_bernoulli(images, index, generator=generator),
        "rand": rand_in_place,
        "bernoulli": lambda: torch.bernoulli(images[index], generator=generator),
    }


@pytest.mark.parametrize("provider", ["fastvae", "rand", "bernoulli"])
def test_binarize_minibatch(benchmark, provider):
    images = torch.rand(ROWS, PIXELS, generator=torch.Generator().manual_seed(1))
    index = torch.randperm(ROWS, generator=torch.Generator().manual_seed(2))[:BATCH]
    benchmark.group = f"binarize a minibatch B={BATCH} of {ROWS}x{PIXELS}"
    benchmark(providers(images, index)[provider])
