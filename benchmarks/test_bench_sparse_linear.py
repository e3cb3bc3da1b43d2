"""The encoder's first layer on binarized images: fastvae.sparse_input_linear against nn.functional.linear.

    pytest benchmarks/test_bench_sparse_linear.py --benchmark-only

Forward and backward (gradients of the weight and bias; x is data) of a 784 -> 200 layer on a
minibatch of 100 binary rows, 13% of them ones (a dynamically binarized MNIST batch), and at 50%
ones, where the op runs the dense product itself (the cost of its density check).
"""

import pytest
import torch
import torch.nn.functional as F

import fastvae

BATCH, IN, OUT = 100, 784, 200


def step(linear, x, weight, bias, grad):
    def run():
        weight.grad = bias.grad = None
        linear(x, weight, bias).backward(grad)

    return run


@pytest.mark.parametrize("density", [0.13, 0.5])
@pytest.mark.parametrize("provider", ["fastvae", "dense"])
def test_first_layer_forward_backward(benchmark, provider, density):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(BATCH, IN, generator=gen) < density).float()
    layer = torch.nn.Linear(IN, OUT)
    grad = torch.randn(BATCH, OUT, generator=gen)
    linear = fastvae.sparse_input_linear if provider == "fastvae" else F.linear
    benchmark.group = f"first layer {IN}->{OUT} fwd+bwd B={BATCH}, {density:.0%} ones"
    run = step(linear, x, layer.weight, layer.bias, grad)
    for _ in range(3):  # warm up: the first call starts the thread pool, which would skew the calibration
        run()
    benchmark(run)
