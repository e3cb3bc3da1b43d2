"""The Burda et al. encoder stack (784-200-200-100, tanh, batch 100) as one fused op against the modules.

    pytest benchmarks/test_bench_fused_mlp.py --benchmark-only

Forward and backward (gradients of every weight and bias; x is data, as an encoder's input is) of
fastvae.nn.FusedMLP, of the nn.Sequential it replaces (same modules, same parameters), and of
torch.compile of that nn.Sequential, on a dynamically binarized MNIST-sized minibatch. On a CPU
where the fused stack measures faster, the mlp architecture may turn it on by default
(fused_mlp / FASTVAE_FUSED_MLP); until then it stays off.
"""

import pytest
import torch
from torch import nn

from fastvae.nn import FusedMLP

BATCH, SIZES = 100, (784, 200, 200, 100)


def encoder_stack() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(SIZES) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def step(model, parameters, x, grad):
    def run():
        for p in parameters:
            p.grad = None
        model(x).backward(grad)

    return run


@pytest.mark.parametrize("provider", ["fastvae", "sequential", "compile"])
def test_encoder_stack_forward_backward(benchmark, provider):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(BATCH, SIZES[0], generator=gen) < 0.13).float()
    grad = torch.randn(BATCH, SIZES[-1], generator=gen)
    seq = encoder_stack()
    model = {"fastvae": lambda: FusedMLP.from_sequential(seq), "sequential": lambda: seq,
             "compile": lambda: torch.compile(seq, fullgraph=True)}[provider]()
    benchmark.group = f"mlp {'-'.join(map(str, SIZES))} tanh fwd+bwd B={BATCH}"
    run = step(model, list(seq.parameters()), x, grad)
    for _ in range(3):  # warm up: thread pool start, and torch.compile's compilation, outside the timing
        run()
    benchmark(run)
