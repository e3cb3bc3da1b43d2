"""Benchmarks of the continuous Bernoulli and the discretized logistic against eager PyTorch.

    pytest benchmarks/test_bench_likelihoods.py --benchmark-only --benchmark-json=benchmarks/likelihoods.json
    python benchmarks/report.py benchmarks/likelihoods.json

Sizes: an MNIST batch (B=128, P=784) and a CIFAR-10 batch (B=128, P=3x32x32), float32, one
sample per example. Providers in providers.py: fastvae, eager (the formula a VAE written in
eager PyTorch uses), compile (that under torch.compile) and, for the continuous Bernoulli,
torch.distributions.ContinuousBernoulli.
"""

import pytest
import torch

from providers import CONTINUOUS_BERNOULLI, DISCRETIZED_LOGISTIC, FLOAT_BYTES, run_mode

SIZES = [(128, 784), (128, 3 * 32 * 32)]
MODES = ["forward", "forward+backward"]


def traffic(param_tensors, batch, pixels, mode):
    """Bytes the op cannot avoid: parameters and x read; in backward also a gradient per parameter."""
    forward = (param_tensors + 1) * batch * pixels * FLOAT_BYTES
    return forward if mode == "forward" else 2 * forward + param_tensors * batch * pixels * FLOAT_BYTES


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B={s[0]},P={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(CONTINUOUS_BERNOULLI))
def test_continuous_bernoulli(benchmark, provider, mode, size):
    batch, pixels = size
    torch.manual_seed(0)
    logits = (2 * torch.randn(batch, pixels)).requires_grad_(mode != "forward")
    x = torch.rand(batch, pixels)
    benchmark.group = f"continuous_bernoulli {mode} B={batch} P={pixels} L=1"
    benchmark.extra_info["bytes"] = traffic(1, batch, pixels, mode)
    benchmark(run_mode(CONTINUOUS_BERNOULLI[provider], (logits, x), mode))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B={s[0]},P={s[1]}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(DISCRETIZED_LOGISTIC))
def test_discretized_logistic(benchmark, provider, mode, size):
    batch, pixels = size
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, pixels)) / 255.0
    mean = (x + 0.05 * torch.randn(batch, pixels)).requires_grad_(mode != "forward")
    log_scale = (-4 + 0.5 * torch.randn(batch, pixels)).requires_grad_(mode != "forward")
    benchmark.group = f"discretized_logistic {mode} B={batch} P={pixels} L=1"
    benchmark.extra_info["bytes"] = traffic(2, batch, pixels, mode)
    benchmark(run_mode(DISCRETIZED_LOGISTIC[provider], (mean, log_scale, x), mode))
